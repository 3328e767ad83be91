// Segmented sort kernels (CuPy backend): stable sort of rows or CSR segments, values + int32
// permutation. Launched by segmented_sort/_cupy.py; the instantiations it uses are listed in
// its CUDA_SOURCES.
//
// Every kernel is templated on B, the unsigned integer type of the element width (the dtype's
// raw bits; values are moved bit-exactly), and takes the dtype kind and the key mode at run time
// (sortgrad_common.cuh). Items are composite (key, column) so every comparison is strict and
// the result is the stable order.
//
// Reversed columns (reverse != 0): items carry the column counted from the segment's end,
// len - 1 - col, and write_sorted maps it back, so equal keys come out in decreasing column
// order. With the key of the opposite direction (the host passes it) this is the sorted row
// read backwards, in the same passes: MODE_SORT_DESC with reverse is the ascending sort read
// backwards, `jnp.sort(descending=True)` (NaNs first, ties by decreasing column).
//
// Segments. Row mode (ragged == 0): segment s is row s, elements [s*row_len, (s+1)*row_len),
// and its outputs go to s*out_cols + position for positions < out_cols (out_cols < row_len:
// only the first out_cols sorted entries are written, as top-k needs). Ragged mode: segment s
// is CSR segment seg_ids[s], elements [offsets[id], offsets[id+1]), outputs in place.
//
// Mapping by length (the host bins segments):
//   sg_sort_small : len <= 2048. A block of 256 threads sorts 2048 >> log2_tile segments of up
//                   to 2^log2_tile elements each (8 <= tile <= 2048) with the bitonic network.
//   sg_sort_tiles : len > 2048. One block per 2048-element tile: sorted items to scratch.
//   sg_merge_pass : merges sorted runs of 2^log2_run items pairwise (merge path: each block
//                   produces 2048 consecutive outputs); the last pass writes values and perm.
#include "sortgrad_bitonic.cuh"

using namespace sg;

// Start and length of segment s.
__device__ __forceinline__ void segment_of(int s, const i64* offsets, const int* seg_ids,
                                           int ragged, i64 row_len, i64& start, i64& len) {
  if (ragged) {
    const int id = seg_ids[s];
    start = offsets[id];
    len = offsets[id + 1] - start;
  } else {
    start = (i64)s * row_len;
    len = row_len;
  }
}

// The column an item carries for column `col` of a segment of `len` elements.
__device__ __forceinline__ u32 item_col(i64 col, i64 len, int reverse) {
  return (u32)(reverse ? len - 1 - col : col);
}

// Writes the sorted entry at `pos` of segment s (of `len` elements): values = input bits at
// the item's column, perm = the column (mapped back when reversed). Row mode drops positions
// >= out_cols.
template <class B, class Item>
__device__ __forceinline__ void write_sorted(const B* keys, B* values, int* perm, int ragged,
                                             int s, i64 start, i64 len, i64 pos, int out_cols,
                                             int reverse, const Item& item) {
  if (!ragged && pos >= out_cols) return;
  const i64 out = ragged ? start + pos : (i64)s * out_cols + pos;
  const u32 idx = item_col((i64)item_idx(item), len, reverse);
  values[out] = keys[start + idx];
  perm[out] = (int)idx;
}

template <class B>
__global__ void SG_LAUNCH_BOUNDS(SORT_THREADS)
sg_sort_small(const B* __restrict__ keys, B* __restrict__ values, int* __restrict__ perm,
              const i64* __restrict__ offsets, const int* __restrict__ seg_ids, int ragged,
              int num_segs, i64 row_len, int out_cols, int kind, int mode, int reverse,
              int log2_tile) {
  typedef ItemOf<B> Ops;
  typedef typename Ops::type Item;
  __shared__ Item s[SPAD_ITEMS];
  __shared__ i64 seg_start[SORT_ITEMS / IPT];  // tile >= IPT: at most 256 segments per block
  __shared__ int seg_len[SORT_ITEMS / IPT];

  const int tile = 1 << log2_tile;
  const int per_block = SORT_ITEMS >> log2_tile;
  const int first = (int)blockIdx.x * per_block;
  for (int i = (int)threadIdx.x; i < per_block; i += SORT_THREADS) {
    i64 start = 0, len = 0;
    if (first + i < num_segs) segment_of(first + i, offsets, seg_ids, ragged, row_len, start, len);
    seg_start[i] = start;
    seg_len[i] = (int)len;  // len <= tile (host binning); 0 past the last segment
  }
  __syncthreads();

  // Load: slot p holds column (p mod tile) of local segment (p / tile); padding sorts last.
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int p = (int)threadIdx.x + r * SORT_THREADS;
    const int local = p >> log2_tile, col = p & (tile - 1);
    Item item = Ops::max();
    if (col < seg_len[local]) {
      item = Ops::make(make_key<B>(keys[seg_start[local] + col], kind, mode),
                       item_col(col, seg_len[local], reverse));
    }
    s[spad(p)] = item;
  }
  __syncthreads();
  Item v[IPT];
  load_blocked(v, s);  // each thread rereads and later rewrites only its own slots: no barrier
  bitonic_sort(v, s, log2_tile);
  store_blocked(v, s);
  __syncthreads();

#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int p = (int)threadIdx.x + r * SORT_THREADS;
    const int local = p >> log2_tile, col = p & (tile - 1);
    if (col < seg_len[local]) {
      write_sorted(keys, values, perm, ragged, first + local, seg_start[local],
                   (i64)seg_len[local], (i64)col, out_cols, reverse, s[spad(p)]);
    }
  }
}

template <class B>
__global__ void SG_LAUNCH_BOUNDS(SORT_THREADS)
sg_sort_tiles(const B* __restrict__ keys, typename ItemOf<B>::type* __restrict__ items,
              const i64* __restrict__ offsets, const int* __restrict__ seg_ids, int ragged,
              int num_segs, i64 row_len, int tiles_per_seg, int kind, int mode, int reverse) {
  typedef ItemOf<B> Ops;
  typedef typename Ops::type Item;
  __shared__ Item s[SPAD_ITEMS];

  const int seg = (int)(blockIdx.x / (unsigned)tiles_per_seg);
  const i64 tile0 = (i64)(blockIdx.x % (unsigned)tiles_per_seg) * SORT_ITEMS;
  if (seg >= num_segs) return;
  i64 start, len;
  segment_of(seg, offsets, seg_ids, ragged, row_len, start, len);
  if (tile0 >= len) return;  // the whole block leaves, before any barrier
  const int count = (int)smin<i64>(len - tile0, SORT_ITEMS);

#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int p = (int)threadIdx.x + r * SORT_THREADS;
    Item item = Ops::max();
    if (p < count) {
      item = Ops::make(make_key<B>(keys[start + tile0 + p], kind, mode),
                       item_col(tile0 + p, len, reverse));
    }
    s[spad(p)] = item;
  }
  __syncthreads();
  Item v[IPT];
  load_blocked(v, s);  // own slots only: no barrier
  bitonic_sort(v, s, LOG2_SORT_ITEMS);
  store_blocked(v, s);
  __syncthreads();
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int p = (int)threadIdx.x + r * SORT_THREADS;
    if (p < count) items[start + tile0 + p] = s[spad(p)];
  }
}

// Number of items of A among the first d items of the merge of sorted A and B (items are
// distinct, so the split is unique).
template <class Item>
__device__ __forceinline__ i64 merge_path(const Item* a, i64 na, const Item* b, i64 nb, i64 d) {
  i64 lo = smax<i64>(0, d - nb), hi = smin<i64>(d, na);
  while (lo < hi) {
    const i64 mid = (lo + hi) >> 1;
    if (item_less(a[mid], b[d - 1 - mid])) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The same on shared memory: A = s[0, na), B = s[na, na + nb) (padded indices).
template <class Item>
__device__ __forceinline__ int merge_path_shared(const Item* s, int na, int nb, int d) {
  int lo = smax(0, d - nb), hi = smin(d, na);
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (item_less(s[spad(mid)], s[spad(na + d - 1 - mid)])) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <class B>
__global__ void SG_LAUNCH_BOUNDS(SORT_THREADS)
sg_merge_pass(const B* __restrict__ keys, const typename ItemOf<B>::type* __restrict__ in,
              typename ItemOf<B>::type* __restrict__ out, B* __restrict__ values,
              int* __restrict__ perm, const i64* __restrict__ offsets,
              const int* __restrict__ seg_ids, int ragged, int num_segs, i64 row_len,
              int out_cols, int reverse, int blocks_per_seg, int log2_run, int final_pass) {
  typedef ItemOf<B> Ops;
  typedef typename Ops::type Item;
  __shared__ Item s[SPAD_ITEMS];
  __shared__ i64 split[2];

  const int seg = (int)(blockIdx.x / (unsigned)blocks_per_seg);
  const i64 first_out = (i64)(blockIdx.x % (unsigned)blocks_per_seg) * SORT_ITEMS;
  if (seg >= num_segs) return;
  i64 start, len;
  segment_of(seg, offsets, seg_ids, ragged, row_len, start, len);
  // Whole-block exits before any barrier: nothing of this segment left, or (last pass, row
  // mode) only positions that are not written.
  if (first_out >= len) return;
  if (final_pass && !ragged && first_out >= out_cols) return;

  // The pair of runs this block's outputs come from: A = [a_begin, a_begin + run),
  // B = the next run, both clipped to the segment.
  const i64 run = (i64)1 << log2_run;
  const i64 a_begin = (first_out >> (log2_run + 1)) << (log2_run + 1);
  const i64 na = smin(run, len - a_begin);
  const i64 nb = smax<i64>(0, smin(run, len - a_begin - run));
  const Item* a = in + start + a_begin;
  const Item* b = a + na;
  const i64 d0 = first_out - a_begin;
  const i64 d1 = smin<i64>(d0 + SORT_ITEMS, na + nb);
  if (threadIdx.x < 2) split[threadIdx.x] = merge_path(a, na, b, nb, threadIdx.x ? d1 : d0);
  __syncthreads();
  const i64 a0 = split[0], a1 = split[1];
  const i64 b0 = d0 - a0;
  const int ca = (int)(a1 - a0), count = (int)(d1 - d0), cb = count - ca;

  // This block's inputs: A[a0, a1) at s[0, ca), B[b0, b0 + cb) at s[ca, count).
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int p = (int)threadIdx.x + r * SORT_THREADS;
    if (p < ca) {
      s[spad(p)] = a[a0 + p];
    } else if (p < count) {
      s[spad(p)] = b[b0 + (p - ca)];
    }
  }
  __syncthreads();

  // Thread t merges outputs [t*IPT, t*IPT + IPT) of the block.
  const int diag = smin((int)threadIdx.x * IPT, count);
  int ia = merge_path_shared(s, ca, cb, diag);
  int ib = diag - ia;
  Item v[IPT];
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    if (ia < ca && (ib >= cb || item_less(s[spad(ia)], s[spad(ca + ib)]))) {
      v[r] = s[spad(ia++)];
    } else if (ib < cb) {
      v[r] = s[spad(ca + ib++)];
    } else {
      v[r] = Ops::max();  // past the block's outputs
    }
  }
  __syncthreads();
  store_blocked(v, s);
  __syncthreads();

#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int p = (int)threadIdx.x + r * SORT_THREADS;
    if (p < count) {
      const i64 pos = first_out + p;
      if (final_pass) {
        write_sorted(keys, values, perm, ragged, seg, start, len, pos, out_cols, reverse,
                     s[spad(p)]);
      } else {
        out[start + pos] = s[spad(p)];
      }
    }
  }
}
