// The small fused elementwise kernels of the soft ops (soft rank, soft sort, soft top-k mask)
// for the CuPy backend (sortgrad/kernels/soft/_cupy.py compiles this file with NVRTC). The ops
// are compositions: segmented sort -> soft_fwd_prep -> isotonic PAV -> soft_finish (forward),
// soft_vjp_prep -> isotonic VJP -> soft_finish (backward); the math is that of soft/_cpu.py,
// the reference, and every intermediate is float64.
//
// Launch mapping (all three kernels): blocks of BLOCK = 256 threads. Rows of n <= STAGE
// (= BLOCK * ITEMS = 2048) entries: a block takes `rpb` = STAGE / n whole rows (rpb * n <= STAGE
// entries, flat index p over them, so loads and stores are coalesced); gathers and scatters
// through the sorting permutation go through a shared-memory stage of the block's rows. Longer
// rows: one block per row (rpb = 1), direct gathers / scatters in global memory. `rpb` is
// uniform per launch, every thread takes part in every barrier.
//
// Per-row "all finite" flag: a row whose input holds NaN or +-inf gives NaN in every output
// entry (block ids 0); prep writes flag[row] = 1 for such rows (0 otherwise), finish reads it.
//
// Float32 in and out without the flush to zero that CuPy's -ftz=true would apply: widen() and
// Narrow<T>::of() (sortgrad_float.cuh) convert through the bits (the CPU keeps subnormals).

#include "sortgrad_common.cuh"
#include "sortgrad_float.cuh"

#if defined(SG_HOST_EMULATION)
#include <cmath>
#include <cstring>
#endif

namespace sg_soft {

typedef long long i64;
typedef unsigned long long u64;

#if defined(SG_HOST_EMULATION)
using std::exp;
using std::log;
#endif

using sg::bits_as;
using sg::Narrow;
using sg::widen;

constexpr int BLOCK = 256;
constexpr int ITEMS = 8;
constexpr int STAGE = BLOCK * ITEMS;  // entries of a block's rows staged in shared memory

// Modes, mirrored in _cupy.py.
// soft_fwd_prep: what goes to the isotonic regression (a: s-argument per row; b: w-argument
// per row (sort KL); wrow: the shared w-argument row)
enum {
  PREP_RANK_L2 = 0,  // a = scale * x_sorted, wrow = rho
  PREP_RANK_KL = 1,  // a = scale * x_sorted, wrow = log rho
  PREP_SORT_L2 = 2,  // a = theta - sign * x_sorted, b = sign * x_sorted (tie keys), wrow = 0
  PREP_SORT_KL = 3,  // a = theta, b = sign * x_sorted (also the tie keys)
  PREP_MASK = 4,     // a = x_sorted / eps, wrow = (1, .., 1, 0, .., 0) with k ones
};
// soft_vjp_prep: a = the isotonic VJP's cotangent, s = its s-argument (KL)
enum {
  VJP_RANK_L2 = 0,  // a = g[perm]
  VJP_RANK_KL = 1,  // a = g[perm] * ranks[perm], s = scale * x[perm]
  VJP_SORT_L2 = 2,  // a = g
  VJP_SORT_KL = 3,  // a = g, s = sign * x[perm]
};
// soft_finish: the values written, from a (prep's output) and t (the isotonic solution or VJP)
enum {
  FIN_RANK_L2 = 0,  // out[perm] = a - t
  FIN_RANK_KL = 1,  // out[perm] = exp(a - t)
  FIN_MASK = 2,     // out[perm] = clip(a - t, 0, 1)
  FIN_SORT = 3,     // out = sign * (theta - t)           (sorted order: no scatter)
  FIN_VJP_RANK = 4,  // out[perm] = (a - t) * scale
  FIN_VJP_SORT = 5,  // out[perm] = t
};

__device__ __forceinline__ double nan_d() { return bits_as<double>(0x7ff8000000000000ull); }

__device__ __forceinline__ bool finite(double v) {
  return (bits_as<u64>(v) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

// Rows of the block: [r0, r0 + nr), all of length n.
struct Rows {
  i64 r0;
  int nr;
  i64 total;  // nr * n entries, starting at r0 * n
};

__device__ __forceinline__ Rows block_rows(int rows, int n, int rpb) {
  Rows b;
  b.r0 = (i64)blockIdx.x * rpb;
  const i64 left = (i64)rows - b.r0;
  b.nr = left < rpb ? (int)left : rpb;
  b.total = (i64)b.nr * n;
  return b;
}

// Stages the block's rows of `src` (total entries) in shared memory, widened. Block-uniform;
// the leading barrier lets the previous readers of the stage finish.
template <class T>
__device__ __forceinline__ void stage_rows(const T* src, double* stage, i64 total) {
  __syncthreads();
  for (i64 q = threadIdx.x; q < total; q += BLOCK) stage[q] = widen(src[q]);
  __syncthreads();
}

// Entry j of local row lr of the block's rows `src`: from the stage or from global memory.
template <class T>
__device__ __forceinline__ double fetch(const T* src, const double* stage, bool staged, int lr,
                                        int n, int j) {
  const i64 q = (i64)lr * n + j;
  return staged ? stage[q] : widen(src[q]);
}

// --- forward: sorted values -> isotonic inputs ------------------------------------------------
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_fwd_prep(const T* __restrict__ sorted, double* __restrict__ a, double* __restrict__ b,
              double* __restrict__ wrow, int* __restrict__ flag, int rows, int n, int rpb,
              int mode, double scale, double inv_eps, int k) {
  __shared__ int bad[STAGE];  // per local row (rpb <= STAGE)
  const int tid = (int)threadIdx.x;
  const Rows blk = block_rows(rows, n, rpb);
  const i64 off = blk.r0 * n;
  // the shared w-argument row (grid-stride, independent of the row mapping)
  if (mode != PREP_SORT_KL) {
    for (i64 j = (i64)blockIdx.x * BLOCK + tid; j < n; j += (i64)gridDim.x * BLOCK) {
      double w = 0.0;
      if (mode == PREP_RANK_L2) w = (double)(n - j);
      else if (mode == PREP_RANK_KL) w = log((double)(n - j));
      else if (mode == PREP_MASK) w = j < k ? 1.0 : 0.0;
      wrow[j] = w;
    }
  }
  for (int q = tid; q < blk.nr; q += BLOCK) bad[q] = 0;
  __syncthreads();
  for (i64 p = tid; p < blk.total; p += BLOCK) {
    const int lr = (int)(p / n);
    const int i = (int)(p - (i64)lr * n);
    const double x = widen(sorted[off + p]);
    if (!finite(x)) bad[lr] = 1;
    const double theta = (double)(n - i) * inv_eps;
    double av;
    if (mode == PREP_SORT_L2) {
      av = theta - scale * x;
      b[off + p] = scale * x;
    } else if (mode == PREP_SORT_KL) {
      av = theta;
      b[off + p] = scale * x;
    } else {
      av = x * scale;
    }
    a[off + p] = av;
  }
  __syncthreads();
  for (int q = tid; q < blk.nr; q += BLOCK) flag[blk.r0 + q] = bad[q];
}

// --- backward: cotangent and residuals -> the isotonic VJP's inputs ---------------------------
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_vjp_prep(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ ranks,
              const int* __restrict__ perm, double* __restrict__ a, double* __restrict__ s,
              int* __restrict__ flag, int rows, int n, int rpb, int mode, double scale) {
  __shared__ double stage[STAGE];
  __shared__ int bad[STAGE];
  const int tid = (int)threadIdx.x;
  const Rows blk = block_rows(rows, n, rpb);
  const i64 off = blk.r0 * n;
  const bool staged = n <= STAGE;  // uniform: then blk.total <= STAGE
  const bool rank = mode == VJP_RANK_L2 || mode == VJP_RANK_KL;
  const bool kl = mode == VJP_RANK_KL || mode == VJP_SORT_KL;
  for (int q = tid; q < blk.nr; q += BLOCK) bad[q] = 0;
  __syncthreads();
  // chunks of STAGE entries (one chunk when staged); each thread owns entries base + tid + c B
  for (i64 base = 0; base < blk.total; base += STAGE) {
    int lr[ITEMS], j[ITEMS];
    double sv[ITEMS], av[ITEMS];
#pragma unroll
    for (int c = 0; c < ITEMS; ++c) {
      const i64 p = base + tid + (i64)c * BLOCK;
      lr[c] = -1;
      j[c] = -1;
      sv[c] = 0.0;
      av[c] = 0.0;
      if (p < blk.total) {
        lr[c] = (int)(p / n);
        const int t = perm[off + p];
        j[c] = (t >= 0 && t < n) ? t : -1;  // out-of-range entries read as NaN (memory safety)
      }
    }
    if (staged) stage_rows(x + off, stage, blk.total);
#pragma unroll
    for (int c = 0; c < ITEMS; ++c) {
      if (lr[c] >= 0) {
        const double xv = j[c] >= 0 ? fetch(x + off, stage, staged, lr[c], n, j[c]) : nan_d();
        if (!finite(xv)) bad[lr[c]] = 1;
        sv[c] = xv * scale;
      }
    }
    if (rank) {
      if (staged) stage_rows(g + off, stage, blk.total);
#pragma unroll
      for (int c = 0; c < ITEMS; ++c) {
        if (lr[c] >= 0 && j[c] >= 0) av[c] = fetch(g + off, stage, staged, lr[c], n, j[c]);
      }
      if (mode == VJP_RANK_KL) {
        if (staged) stage_rows(ranks + off, stage, blk.total);
#pragma unroll
        for (int c = 0; c < ITEMS; ++c) {
          if (lr[c] >= 0 && j[c] >= 0) {
            av[c] *= fetch(ranks + off, stage, staged, lr[c], n, j[c]);
          }
        }
      }
    }
#pragma unroll
    for (int c = 0; c < ITEMS; ++c) {
      const i64 p = base + tid + (i64)c * BLOCK;
      if (lr[c] >= 0) {
        a[off + p] = rank ? av[c] : widen(g[off + p]);
        if (kl) s[off + p] = sv[c];
      }
    }
  }
  __syncthreads();
  for (int q = tid; q < blk.nr; q += BLOCK) flag[blk.r0 + q] = bad[q];
}

// --- the outputs ------------------------------------------------------------------------------
// out (and, with `ids`, block ids 0 on flagged rows) from a and t; scattered through perm
// except for FIN_SORT. A flagged row is NaN at every position (written without perm).
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_finish(const double* __restrict__ a, const double* __restrict__ t,
            const int* __restrict__ perm, const int* __restrict__ flag, T* __restrict__ out,
            int* __restrict__ ids, int write_ids, int rows, int n, int rpb, int mode,
            double scale, double inv_eps) {
  __shared__ double stage_raw[STAGE];  // staged output rows (as T)
  T* stage = reinterpret_cast<T*>(stage_raw);
  const int tid = (int)threadIdx.x;
  const Rows blk = block_rows(rows, n, rpb);
  const i64 off = blk.r0 * n;
  const bool staged = n <= STAGE;
  const bool scatter = mode != FIN_SORT;
  for (i64 p = tid; p < blk.total; p += BLOCK) {
    const int lr = (int)(p / n);
    const int i = (int)(p - (i64)lr * n);
    const bool bad = flag[blk.r0 + lr] != 0;
    if (bad) {
      if (write_ids) ids[off + p] = 0;
      const T v = Narrow<T>::of(nan_d());
      if (staged && scatter) stage[p] = v;
      else out[off + p] = v;
      continue;
    }
    const double d = a[off + p] - t[off + p];
    double v;
    switch (mode) {
      case FIN_RANK_L2: v = d; break;
      case FIN_RANK_KL: v = exp(d); break;
      case FIN_MASK: v = d < 0.0 ? 0.0 : (d > 1.0 ? 1.0 : d); break;
      case FIN_SORT: v = scale * ((double)(n - i) * inv_eps - t[off + p]); break;
      case FIN_VJP_RANK: v = d * scale; break;
      default: v = t[off + p]; break;  // FIN_VJP_SORT
    }
    const T o = Narrow<T>::of(v);
    if (!scatter) {
      out[off + p] = o;
      continue;
    }
    const int dst = perm[off + p];
    if (dst < 0 || dst >= n) continue;  // memory safety only: perm is a permutation
    if (staged) stage[(i64)lr * n + dst] = o;
    else out[off + (i64)lr * n + dst] = o;
  }
  if (staged && scatter) {  // uniform
    __syncthreads();
    for (i64 q = tid; q < blk.total; q += BLOCK) out[off + q] = stage[q];
  }
}

}  // namespace sg_soft
