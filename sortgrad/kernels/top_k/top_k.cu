// Partial top-k kernels (CuPy backend): the k largest entries of each row, largest first, ties
// to the lower index (the order of jax.lax.top_k). Launched by top_k/_cupy.py.
//
// Items are composite (MODE_TOPK key, column): the key is the complement of IEEE totalOrder,
// so the k smallest items are the answer in order, and items are distinct (stable, exact).
//   sg_topk_filter (k <= 32): warp-level filtering. Each warp keeps its best 32 items sorted
//     across its lanes and a threshold (its k-th best); a batch of 32 elements costs one ballot
//     when nothing beats the threshold, and each element that does is inserted by a ballot
//     (its rank) and a shuffle (shift the tail). Rows of a multiple of 16 bytes are read with
//     16-byte vector loads. The 8 warp lists (256 items) are then sorted
//     by one warp with the register/shuffle bitonic network. A row may be split over `chunks`
//     blocks that write k candidates each; the same kernel then reduces the candidates
//     (items_mode) to the answer.
//   sg_topk_radix (32 < k <= 2048): one block per row (or per chunk, as above). Radix select on
//     8-bit digits of the key (one shared-memory histogram per digit, most significant first)
//     finds the k-th smallest key T and how many entries equal to T are needed; one ordered
//     pass collects the entries < T and the first needed entries == T (block-wide ballot ranks
//     keep index order), and the k survivors are sorted with the block bitonic network.
// Rows short enough for one block (n <= 2048) and k > 2048 use the segmented sort kernels.
#include "sortgrad_bitonic.cuh"

using namespace sg;

constexpr int TOPK_THREADS = SORT_THREADS;  // the block bitonic network's block
constexpr int TOPK_WARPS = TOPK_THREADS / WARP;
constexpr int FILTER_UNROLL = 4;  // independent loads in flight per lane

// 16 bytes seen as one vector load or as elements
template <class B>
union Vector16 {
  uint4 v;
  B e[16 / sizeof(B)];
};

// Offers each lane's `item` to the warp's sorted list `best` (see sg_topk_filter); every lane
// of the warp calls it. Costs one ballot when no lane's item beats the threshold.
template <class Item>
__device__ __forceinline__ void warp_insert(Item& best, Item& thr, const Item& item, int k) {
  const int lane = lane_id();
  unsigned pending = __ballot_sync(FULL_MASK, item_less(item, thr));
  while (pending) {  // warp-uniform
    const int src = __ffs((int)pending) - 1;
    pending &= pending - 1;
    const Item c = shfl_item(item, src);
    if (item_less(c, thr)) {  // thr may have dropped since the ballot
      // rank of c in the sorted list = number of lanes holding a better item
      const int pos = __popc(__ballot_sync(FULL_MASK, item_less(best, c)));
      const Item up = shfl_up_item(best, 1);
      if (lane == pos) {
        best = c;
      } else if (lane > pos) {
        best = up;
      }
      thr = shfl_item(best, k - 1);
    }
  }
}

template <class B>
__global__ void SG_LAUNCH_BOUNDS(TOPK_THREADS)
sg_topk_filter(const B* __restrict__ x, i64 n, const typename ItemOf<B>::type* __restrict__ cand_in,
               int items_mode, i64 n_in, int chunks, i64 chunk_len, int k, int kind,
               typename ItemOf<B>::type* __restrict__ cand_out, int write_candidates,
               B* __restrict__ values, int* __restrict__ indices) {
  typedef ItemOf<B> Ops;
  typedef typename Ops::type Item;
  __shared__ Item lists[TOPK_THREADS];

  // This block: columns [lo, hi) of row `row` -- of x (n per row), or of the candidate items
  // (n_in per row, one chunk) in items_mode.
  const i64 row = blockIdx.x / (unsigned)chunks;
  const int chunk = (int)(blockIdx.x % (unsigned)chunks);
  const i64 lo = (i64)chunk * chunk_len;
  const i64 hi = smin(items_mode ? n_in : n, lo + chunk_len);
  const B* xr = x + row * n;
  const Item* cr = cand_in + row * n_in;  // read only in items_mode
  const int lane = lane_id();

  // Invariant: `best` across the warp's lanes is sorted ascending and its first k entries are
  // the k best items the warp has seen; thr = best of lane k-1 (max() until k are seen).
  Item best = Ops::max();
  Item thr = Ops::max();
  // 16-byte loads when every lane's VEC elements are aligned: rows of a multiple of 16 bytes
  // (the host makes chunk_len a multiple of 16 elements). Warp w takes strips of WARP * VEC
  // consecutive elements, lane l the VEC elements at l * VEC of the strip.
  constexpr int VEC = 16 / (int)sizeof(B);
  const bool vector_loads = !items_mode && (n * (i64)sizeof(B)) % 16 == 0 &&
                            ((unsigned long long)x) % 16 == 0;
  if (vector_loads) {
    for (i64 base = lo + (i64)warp_id() * WARP * VEC; base < hi;
         base += (i64)TOPK_THREADS * VEC) {
      const i64 j0 = base + (i64)lane * VEC;
      Item it[VEC];
      if (j0 + VEC <= hi) {
        Vector16<B> q;
        q.v = *reinterpret_cast<const uint4*>(xr + j0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          it[e] = Ops::make(make_key<B>(q.e[e], kind, MODE_TOPK), (u32)(j0 + e));
        }
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          it[e] = j0 + e < hi ? Ops::make(make_key<B>(xr[j0 + e], kind, MODE_TOPK), (u32)(j0 + e))
                              : Ops::max();
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) warp_insert(best, thr, it[e], k);
    }
  } else {
    for (i64 base = lo + (i64)warp_id() * WARP; base < hi;
         base += (i64)TOPK_THREADS * FILTER_UNROLL) {
      Item it[FILTER_UNROLL];
#pragma unroll
      for (int u = 0; u < FILTER_UNROLL; ++u) {
        const i64 j = base + (i64)u * TOPK_THREADS + lane;
        it[u] = Ops::max();
        if (j < hi) {
          it[u] = items_mode ? cr[j] : Ops::make(make_key<B>(xr[j], kind, MODE_TOPK), (u32)j);
        }
      }
#pragma unroll
      for (int u = 0; u < FILTER_UNROLL; ++u) warp_insert(best, thr, it[u], k);
    }
  }

  // The union of the warp lists holds the block's k best (k <= 32): one warp sorts all 256.
  lists[threadIdx.x] = best;
  __syncthreads();
  if (warp_id() == 0) {
    Item v[IPT];
#pragma unroll
    for (int r = 0; r < IPT; ++r) v[r] = lists[lane * IPT + r];
    bitonic_sort(v, (Item*)0, 8);  // 256 items: registers and shuffles only
#pragma unroll
    for (int r = 0; r < IPT; ++r) {
      const int i = lane * IPT + r;
      if (i < k) {
        if (write_candidates) {
          cand_out[(row * chunks + chunk) * k + i] = v[r];
        } else {
          const u32 idx = item_idx(v[r]);
          values[row * k + i] = xr[idx];
          indices[row * k + i] = (int)idx;
        }
      }
    }
  }
}

// One element of the block's range: its key and column, from x or from candidate items.
template <class B, class Item>
__device__ __forceinline__ void element(const B* xr, const Item* cr, int items_mode, i64 j,
                                        int kind, B& key, u32& col) {
  if (items_mode) {
    const Item it = cr[j];
    key = (B)item_key(it);
    col = item_idx(it);
  } else {
    key = make_key<B>(xr[j], kind, MODE_TOPK);
    col = (u32)j;
  }
}

template <class B>
__global__ void SG_LAUNCH_BOUNDS(TOPK_THREADS)
sg_topk_radix(const B* __restrict__ x, i64 n, const typename ItemOf<B>::type* __restrict__ cand_in,
              int items_mode, i64 n_in, int chunks, i64 chunk_len, int k, int kind,
              typename ItemOf<B>::type* __restrict__ cand_out, int write_candidates,
              B* __restrict__ values, int* __restrict__ indices) {
  typedef ItemOf<B> Ops;
  typedef typename Ops::type Item;
  __shared__ Item s[SPAD_ITEMS];
  __shared__ int hist[256];
  __shared__ int scratch[TOPK_WARPS];
  __shared__ int chosen[2];

  // This block: [lo, hi) of row `row`, as in sg_topk_filter. Only the last chunk of a row may
  // hold fewer than k elements (the host makes chunk_len >= k): it selects all of them and pads
  // its candidate list with max() items, which sort after every real candidate.
  const i64 row = blockIdx.x / (unsigned)chunks;
  const int chunk = (int)(blockIdx.x % (unsigned)chunks);
  const i64 lo = (i64)chunk * chunk_len;
  const i64 hi = smin(items_mode ? n_in : n, lo + chunk_len);
  const B* xr = x + row * n;
  const Item* cr = cand_in + row * n_in;  // read only in items_mode
  const int t = (int)threadIdx.x;
  const int want = (int)smin<i64>(k, hi - lo);

  // Radix select. Invariant: the answer is the elements whose key is below every key matching
  // `prefix` on the bits of `known`, plus the `remaining` smallest of those that match.
  B prefix = 0, known = 0;
  int remaining = want;
  for (int shift = (int)sizeof(B) * 8 - 8; shift >= 0; shift -= 8) {
    hist[t] = 0;
    __syncthreads();
    for (i64 j = lo + t; j < hi; j += TOPK_THREADS) {
      B key;
      u32 col;
      element(xr, cr, items_mode, j, kind, key, col);
      if ((B)(key & known) == prefix) atomicAdd(&hist[(int)((key >> shift) & 0xFF)], 1);
    }
    __syncthreads();
    // digit d = t: elements below it, and up to it; exactly one digit brackets `remaining`
    const int c = hist[t];
    int total;
    const int upto = block_inclusive_sum<TOPK_WARPS>(c, scratch, total);
    const int below = upto - c;
    if (below < remaining && remaining <= upto) {
      chosen[0] = t;
      chosen[1] = remaining - below;
    }
    __syncthreads();
    prefix = (B)(prefix | (B)((B)chosen[0] << shift));
    known = (B)(known | (B)((B)0xFF << shift));
    remaining = chosen[1];
    // hist is next written by its own thread, chosen only after two more barriers
  }

  // Ordered collection: every key < T, then the first `remaining` keys == T in range order
  // (range order is column order: in items_mode, chunks are in column order and each chunk's
  // candidates are sorted, so equal keys appear by increasing column).
  const B threshold = prefix;
  int taken = 0, equal_seen = 0;
  for (i64 base = lo; base < hi && taken < want; base += TOPK_THREADS) {  // uniform condition
    const i64 j = base + t;
    B key = 0;
    u32 col = 0;
    bool less = false, equal = false;
    if (j < hi) {
      element(xr, cr, items_mode, j, kind, key, col);
      less = key < threshold;
      equal = key == threshold;
    }
    int equal_total, taken_now;
    const int equal_rank = block_flag_rank<TOPK_WARPS>(equal, scratch, equal_total);
    const bool take = less || (equal && equal_seen + equal_rank < remaining);
    const int pos = block_flag_rank<TOPK_WARPS>(take, scratch, taken_now);
    if (take) s[spad(taken + pos)] = Ops::make(key, col);
    taken += taken_now;
    equal_seen += equal_total;
  }
  for (int p = t; p < SORT_ITEMS; p += TOPK_THREADS) {
    if (p >= want) s[spad(p)] = Ops::max();
  }
  __syncthreads();

  // Sort the survivors (first slice of 2^ceil(log2 k) items) and write them.
  int log2_tile = 1;
  while ((1 << log2_tile) < k) ++log2_tile;
  Item v[IPT];
  load_blocked(v, s);  // own slots only: no barrier before the network
  bitonic_sort(v, s, log2_tile);
  store_blocked(v, s);
  __syncthreads();
  for (int p = t; p < k; p += TOPK_THREADS) {
    const Item it = s[spad(p)];
    if (write_candidates) {
      cand_out[(row * chunks + chunk) * k + p] = it;
    } else {
      const u32 idx = item_idx(it);
      values[row * k + p] = xr[idx];
      indices[row * k + p] = (int)idx;
    }
  }
}
