// Bitonic sorting network over the items of one thread block, in registers, warp shuffles and
// shared memory.
//
// Layout ("blocked"): a block of SORT_THREADS threads holds SORT_ITEMS = SORT_THREADS * IPT
// items; thread t holds items t*IPT .. t*IPT+IPT-1 in registers v[0..IPT). bitonic_sort()
// sorts every aligned slice of 2^log2_tile items independently, ascending by item_less, so a
// block sorts SORT_ITEMS >> log2_tile segments at once (several short rows per block) or one
// whole tile.
//
// Network: the "flip" form of bitonic sort. For each merge size k = 2, 4, ..., tile: compare
// item i with its mirror i ^ (k-1) in the same k-slice, then half-cleaners i ^ j for
// j = k/4, ..., 1; every comparator puts the smaller item at the lower index, so no direction
// bits are needed and every slice ends ascending. A comparator of distance d runs
//   d < IPT       : inside a thread (compile-time register indices),
//   d < 32 * IPT  : across lanes with __shfl_xor_sync (partner lane = lane ^ (d / IPT)),
//   otherwise     : through shared memory (two __syncthreads).
// With tile <= 32 * IPT no shared memory or __syncthreads is used, so a single warp may call
// bitonic_sort(v, nullptr, log2_tile <= 8) on its own.
#pragma once

#include "sortgrad_common.cuh"

namespace sg {

constexpr int SORT_THREADS = 256;
constexpr int IPT = 8;  // items per thread
constexpr int SORT_ITEMS = SORT_THREADS * IPT;
constexpr int LOG2_SORT_ITEMS = 11;
constexpr int WARP_ITEMS = WARP * IPT;  // comparators shorter than this stay inside a warp

// Shared-memory index with one pad slot every 16 items (fewer bank conflicts when thread t
// reads its IPT consecutive items).
__device__ __forceinline__ int spad(int i) { return i + (i >> 4); }
constexpr int SPAD_ITEMS = SORT_ITEMS + SORT_ITEMS / 16;

// mine := the smaller (lower) or the larger of (mine, other)
template <class Item>
__device__ __forceinline__ void keep(Item& mine, const Item& other, bool lower) {
  if (lower == item_less(other, mine)) mine = other;
}

template <class Item>
__device__ __forceinline__ void order_pair(Item& a, Item& b) {
  if (item_less(b, a)) {
    const Item t = a;
    a = b;
    b = t;
  }
}

// comparators (r, r ^ M) inside a thread, M = 1, 3, 7 (flip) or M = 1, 2, 4 (half-cleaner
// when M is a power of two: (r, r | M) for r without bit M is the same set of pairs)
template <int M, class Item>
__device__ __forceinline__ void thread_stage(Item (&v)[IPT]) {
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    if (r < (r ^ M)) order_pair(v[r], v[r ^ M]);
  }
}

// half-cleaner of distance d * IPT: partner lane = lane ^ d, same register
template <class Item>
__device__ __forceinline__ void warp_half(Item (&v)[IPT], int d) {
  const bool lower = (lane_id() & d) == 0;
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const Item o = shfl_xor_item(v[r], d);
    keep(v[r], o, lower);
  }
}

// flip of merge size k = (m + 1) * IPT, 16 <= k <= 32 * IPT: partner of item lane*IPT + r is
// item (lane ^ m)*IPT + (IPT-1-r)
template <class Item>
__device__ __forceinline__ void warp_flip(Item (&v)[IPT], int m) {
  const int lane = lane_id();
  const bool lower = lane < (lane ^ m);
  Item o[IPT];
#pragma unroll
  for (int r = 0; r < IPT; ++r) o[r] = shfl_xor_item(v[IPT - 1 - r], m);
#pragma unroll
  for (int r = 0; r < IPT; ++r) keep(v[r], o[r], lower);
}

// comparator i ^ mask through shared memory (any distance); every thread of the block calls it
template <class Item>
__device__ __forceinline__ void smem_stage(Item (&v)[IPT], Item* s, int mask) {
  const int base = (int)threadIdx.x * IPT;
#pragma unroll
  for (int r = 0; r < IPT; ++r) s[spad(base + r)] = v[r];
  __syncthreads();
#pragma unroll
  for (int r = 0; r < IPT; ++r) {
    const int i = base + r, q = i ^ mask;
    keep(v[r], s[spad(q)], i < q);
  }
  __syncthreads();
}

// Sorts every aligned 2^log2_tile slice of the block's items (log2_tile <= LOG2_SORT_ITEMS,
// uniform across the block). `s`: SPAD_ITEMS items of shared memory (unused, may be null,
// when log2_tile <= log2(WARP_ITEMS)).
template <class Item>
__device__ void bitonic_sort(Item (&v)[IPT], Item* s, int log2_tile) {
  for (int lk = 1; lk <= log2_tile; ++lk) {
    const int k = 1 << lk;
    if (k == 2) {
      thread_stage<1>(v);
    } else if (k == 4) {
      thread_stage<3>(v);
    } else if (k == 8) {
      thread_stage<7>(v);
    } else if (k <= WARP_ITEMS) {
      warp_flip(v, k / IPT - 1);
    } else {
      smem_stage(v, s, k - 1);
    }
    for (int j = k >> 2; j >= 1; j >>= 1) {
      if (j >= WARP_ITEMS) {
        smem_stage(v, s, j);
      } else if (j >= IPT) {
        warp_half(v, j / IPT);
      } else if (j == 4) {
        thread_stage<4>(v);
      } else if (j == 2) {
        thread_stage<2>(v);
      } else {
        thread_stage<1>(v);
      }
    }
  }
}

// Blocked registers <-> shared memory (padded index).
template <class Item>
__device__ __forceinline__ void store_blocked(const Item (&v)[IPT], Item* s) {
  const int base = (int)threadIdx.x * IPT;
#pragma unroll
  for (int r = 0; r < IPT; ++r) s[spad(base + r)] = v[r];
}
template <class Item>
__device__ __forceinline__ void load_blocked(Item (&v)[IPT], const Item* s) {
  const int base = (int)threadIdx.x * IPT;
#pragma unroll
  for (int r = 0; r < IPT; ++r) v[r] = s[spad(base + r)];
}

}  // namespace sg
