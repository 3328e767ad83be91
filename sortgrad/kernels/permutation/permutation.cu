// Permutation scatter and inverse permutation kernels (CuPy backend), launched by
// permutation/_cupy.py: out[r, perm[r, i]] = values[r, i] (zeros elsewhere), and the inverse
// permutation as the scatter of the column numbers (IOTA). B is the unsigned type of the value
// width: values move as raw bits. Entries of perm outside [0, n) are skipped, never written.
//   sg_scatter_staged (n * sizeof(B) <= 32 KiB): a block takes rows_per_block whole rows, zeroes
//     them in shared memory, scatters there (random access stays on chip) and writes the rows
//     out contiguously, so global reads and writes are coalesced.
//   sg_scatter_direct (longer rows): a grid-stride pass of coalesced reads and scattered global
//     writes into an output the host zeroed first (or, for the inverse, left uninitialised:
//     a valid permutation writes every entry).
#include "sortgrad_common.cuh"

using namespace sg;

constexpr int SCATTER_THREADS = 256;
constexpr int STAGE_BYTES = 32768;

template <class B, int IOTA>
__global__ void SG_LAUNCH_BOUNDS(SCATTER_THREADS)
sg_scatter_staged(const B* __restrict__ values, const int* __restrict__ perm, B* __restrict__ out,
                  int rows, int m, int n, int rows_per_block) {
  __shared__ u64 stage_words[STAGE_BYTES / sizeof(u64)];
  B* stage = reinterpret_cast<B*>(stage_words);

  const int row0 = (int)blockIdx.x * rows_per_block;
  const int nrows = smin(rows_per_block, rows - row0);
  const int out_count = nrows * n, in_count = nrows * m;
  for (int i = (int)threadIdx.x; i < out_count; i += SCATTER_THREADS) stage[i] = 0;
  __syncthreads();
  const i64 in0 = (i64)row0 * m;
  for (int i = (int)threadIdx.x; i < in_count; i += SCATTER_THREADS) {
    const int r = i / m, c = i - r * m;
    const int p = perm[in0 + i];
    if ((unsigned)p < (unsigned)n) stage[r * n + p] = IOTA ? (B)c : values[in0 + i];
  }
  __syncthreads();
  const i64 out0 = (i64)row0 * n;
  for (int i = (int)threadIdx.x; i < out_count; i += SCATTER_THREADS) out[out0 + i] = stage[i];
}

template <class B, int IOTA>
__global__ void SG_LAUNCH_BOUNDS(SCATTER_THREADS)
sg_scatter_direct(const B* __restrict__ values, const int* __restrict__ perm, B* __restrict__ out,
                  i64 total, int m, int n) {
  const i64 stride = (i64)gridDim.x * SCATTER_THREADS;
  for (i64 g = (i64)blockIdx.x * SCATTER_THREADS + threadIdx.x; g < total; g += stride) {
    const int p = perm[g];
    if ((unsigned)p < (unsigned)n) {
      const i64 r = g / m;
      out[r * n + p] = IOTA ? (B)(g - r * m) : values[g];
    }
  }
}
