// Decreasing isotonic regression (pool adjacent violators, PAV) of each row and its VJP, for
// the CuPy backend (sortgrad/kernels/isotonic/_cupy.py compiles this file with NVRTC).
//
// Semantics: those of isotonic/_cpu.py, the reference.
//   * Decreasing fit: v_1 >= ... >= v_n. A pooled block B takes
//       L2: mean(s_B - w_B)        KL: logsumexp(s_B) - logsumexp(w_B)  (max-shifted).
//   * Neighbours are pooled on a violation and on equality, value(left) <= value(right) (the
//     pooled side of a kink, DESIGN.md "Kinks"; exact float comparisons), see `pools`. The
//     soft ops (soft.cu's compositions) may pass the sorted input values as tie keys: then two
//     equal neighbouring blocks whose keys are all tied (key at the left block's start ==
//     key at the right block's last entry; the rows are sorted descending) stay apart.
//   * Block accumulators are float64 for float and double input alike. A singleton's value is
//     s - w exactly (log(1) == 0 in the KL formula).
//   * float32 in and out as on the CPU, subnormals included, although CuPy compiles with
//     -ftz=true: every float32 load is widened with widen(), every float32 result narrowed with
//     Narrow<T>::of() (sortgrad_float.cuh: through the bits), all arithmetic is float64.
//   * Clamp: the solution is the running minimum of the block values from the left (the stacks
//     compare the values they store, so it changes nothing unless a value is recomputed; kept
//     as the CPU keeps it).
//   * Block ids: int32, the pooled runs of a row numbered 0, 1, ... from the left
//     (= prefix count of block starts - 1).
//   * VJP, per maximal run B of equal block ids (ids are never used as indices: any int32
//     values are memory-safe): L2 grad_s = mean_B(g), grad_w = -grad_s; KL
//     grad_s = softmax(s_B) sum_B(g), grad_w = -softmax(w_B) sum_B(g), max-shifted.
//   Block sums are associated in a different order than on the CPU (tree instead of left to
//   right), so results agree to float64 rounding; block ids agree except where two
//   neighbouring block values tie to rounding. The pooling test depends on the two blocks
//   only (values and extents), so the stack arguments below hold for it as for a plain <.
//
// Launch mapping (every kernel: blocks of BLOCK = 256 threads; every thread of a block takes
// part in every barrier; idle threads see empty chunks):
//   *_small: rows of n <= BLOCK * items. A row is handled by a *group* of G threads (G a power
//     of two, G * items >= n), a block holds BLOCK / G rows. Thread `lane` of a group owns the
//     contiguous chunk [lane * items, lane * items + items) of its row. The whole row lives in
//     shared memory (one region per group).
//   *_large: rows longer than one tile (tile = BLOCK * items). A block handles one row at a
//     time (persistent: rows blockIdx.x, blockIdx.x + gridDim.x, ...) and sweeps its tiles;
//     state that outlives a tile lives in a global scratch buffer of n entries per block.
//
// Forward, per tile:
//   0. the entries' leaf accumulators are loaded coalesced into the tile's shared arrays.
//   1. chunk_pav: each thread runs PAV on its chunk. Blocks live *at their start position* p
//      of the tile's shared arrays: end[p] = end of the block (exclusive), -1 where no block
//      starts; acc[p] = its accumulators; begin[e - 1] = p at its last entry, so the block
//      below the one starting at p starts at begin[p - 1]. Pooling never moves data.
//   2. tree_merge: log2(G) levels; at each, one thread per pair of adjacent segments pools
//      across their boundary (merge_pair). Pooling the blocks of sub-PAVs and pooling again is
//      exact: the final blocks are unions of sub-blocks, and the only violations left after
//      two valid stacks meet are next to the block that grows across the boundary.
//   3. small: a group scan of (block-start count, min block value) gives ids and the clamped
//      solution, written coalesced through shared memory (store_tile).
//      large: the row's blocks so far form a compact stack in global memory (slot k: start in
//      ids[k] -- slot k <= its start, so the output row has room -- and accumulators in the
//      scratch). Warp 0 pools the tile's bottom block with the stack top, 32 stack blocks per
//      step (a shuffle scan of the candidate pools and a ballot for the first non-violation),
//      and with the tile's next blocks; then the tile's remaining blocks are appended by a
//      block scan. After the last tile: a prefix-min pass over the stack (the clamp), then a
//      right-to-left pass over the tiles writes ids and solution coalesced (right to left, so the
//      output writes of a tile never clobber stack slots a later pass still reads: those are
//      below the tile's first position).
//
// VJP: a segmented scan over (head flag, head count, run accumulators) where a head is an
// entry whose id differs from its left neighbour's. small: run totals go to shared memory by
// run index, then every entry reads its own. large: pass A writes the run totals to the
// global scratch by run index (the carry crosses tiles), pass B reads them back.
//
// No synchronisation with the host anywhere; everything runs on the stream it is launched on.

#include "sortgrad_common.cuh"
#include "sortgrad_float.cuh"

#if defined(SG_HOST_EMULATION)
#include <cmath>
#include <cstring>
#endif

namespace sg_iso {

typedef long long i64;

using sg::Narrow;
using sg::widen;

#if defined(SG_HOST_EMULATION)
using std::exp;
using std::log;
inline double __longlong_as_double(long long bits) {
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}
#endif

// Launch constants, mirrored in _cupy.py (BLOCK, ITEMS): threads per block, and entries per
// thread (a tile is BLOCK * items entries) of the L2 and KL kernels, sized so that a tile's
// shared arrays stay below 48 KiB of static shared memory.
constexpr int BLOCK = 256;
constexpr int WARPS = BLOCK / 32;
constexpr int ITEMS_L2 = 8;
constexpr int ITEMS_KL = 4;
constexpr unsigned FULL = 0xffffffffu;
constexpr int SCAN_WORDS = 8;  // doubles of scan scratch per warp (largest item: 56 bytes)

__device__ __forceinline__ double pos_inf() {
  return __longlong_as_double(0x7ff0000000000000LL);
}
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
// min as the CPU clamp computes it: b only if b < a.
__device__ __forceinline__ double dmin(double a, double b) { return b < a ? b : a; }

// Pools two max-shifted sums (m1, s1), (m2, s2) of exp: the result sums exp(x - m) over both.
__device__ __forceinline__ void lse_merge(double m1, double s1, double m2, double s2,
                                          double& m, double& s) {
  if (m1 >= m2) {
    m = m1;
    s = s1 + s2 * exp(m2 - m1);
  } else {
    m = m2;
    s = s2 + s1 * exp(m1 - m2);
  }
}

// --- forward accumulators ---------------------------------------------------------------
// A block in registers is (acc, count); in memory only acc is stored (counts come from the
// block extents).
template <int REG> struct Pav;

template <> struct Pav<0> {  // L2: value = sum(s - w) / count
  static constexpr int ITEMS = ITEMS_L2;
  struct Acc {
    double sum;
  };
  template <class T>
  static __device__ __forceinline__ Acc leaf(T s, T w) {
    Acc a;
    a.sum = widen(s) - widen(w);
    return a;
  }
  static __device__ __forceinline__ Acc merge(const Acc& l, const Acc& r) {
    Acc a;
    a.sum = l.sum + r.sum;
    return a;
  }
  static __device__ __forceinline__ double value(const Acc& a, int count) {
    return a.sum / (double)count;
  }
};

template <> struct Pav<1> {  // KL: value = (ms - mw) + (log ss - log sw), as _cpu.kl_value
  static constexpr int ITEMS = ITEMS_KL;
  struct Acc {
    double ms, ss, mw, sw;
  };
  template <class T>
  static __device__ __forceinline__ Acc leaf(T s, T w) {
    Acc a;
    a.ms = widen(s);
    a.ss = 1.0;
    a.mw = widen(w);
    a.sw = 1.0;
    return a;
  }
  static __device__ __forceinline__ Acc merge(const Acc& l, const Acc& r) {
    Acc a;
    lse_merge(l.ms, l.ss, r.ms, r.ss, a.ms, a.ss);
    lse_merge(l.mw, l.sw, r.mw, r.sw, a.mw, a.sw);
    return a;
  }
  static __device__ __forceinline__ double value(const Acc& a, int) {
    return (a.ms - a.mw) + (log(a.ss) - log(a.sw));
  }
};


static_assert(sizeof(Pav<0>::Acc) == 8, "mirrored as _FWD_ACC_BYTES in _cupy.py");
static_assert(sizeof(Pav<1>::Acc) == 32, "mirrored as _FWD_ACC_BYTES in _cupy.py");

template <class Acc> struct Block {
  Acc acc;
  int count;
  int pad;
};

template <class P>
__device__ __forceinline__ Block<typename P::Acc> make_block(const typename P::Acc& acc,
                                                             int count) {
  Block<typename P::Acc> b;
  b.acc = acc;
  b.count = count;
  b.pad = 0;
  return b;
}

template <class P>
__device__ __forceinline__ Block<typename P::Acc> merge_blocks(
    const Block<typename P::Acc>& l, const Block<typename P::Acc>& r) {
  return make_block<P>(P::merge(l.acc, r.acc), l.count + r.count);
}

template <class P>
__device__ __forceinline__ double block_value(const Block<typename P::Acc>& b) {
  return P::value(b.acc, b.count);
}

// --- warp shuffles of any 4-byte-multiple struct (every lane of the warp takes part) --------
template <class V>
__device__ __forceinline__ V shfl_up_v(const V& v, int delta, int width) {
  static_assert(sizeof(V) % 4 == 0, "shuffled structs are whole 32-bit words");
  int words[sizeof(V) / 4];
  memcpy(words, &v, sizeof(V));
#pragma unroll
  for (int i = 0; i < (int)(sizeof(V) / 4); ++i) words[i] = __shfl_up_sync(FULL, words[i], delta, width);
  V out;
  memcpy(&out, words, sizeof(V));
  return out;
}

template <class V>
__device__ __forceinline__ V shfl_v(const V& v, int src_lane, int width) {
  static_assert(sizeof(V) % 4 == 0, "shuffled structs are whole 32-bit words");
  int words[sizeof(V) / 4];
  memcpy(words, &v, sizeof(V));
#pragma unroll
  for (int i = 0; i < (int)(sizeof(V) / 4); ++i) words[i] = __shfl_sync(FULL, words[i], src_lane, width);
  V out;
  memcpy(&out, words, sizeof(V));
  return out;
}

// Barrier of a group: a warp's lanes for G <= 32 (groups never straddle warps), else the block.
__device__ __forceinline__ void group_sync(int group) {
  if (group <= 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Exclusive scan of x over the threads of each group of `group` consecutive threads (a power of
// two dividing BLOCK), in thread order, with the associative `op` and its identity `id`
// (op(id, x) == x). Returns the exclusive prefix and sets *total to the group's aggregate.
// Every thread of the block must call it (uniformly); `raw` is shared scratch of
// WARPS * SCAN_WORDS doubles, free again when this returns.
template <class V, class Op>
__device__ __forceinline__ V group_scan_exclusive(const V& x, const V& id, int group,
                                                  double* raw, Op op, V* total) {
  static_assert(sizeof(V) <= 8 * SCAN_WORDS, "scan scratch too small");
  V* warp_buf = reinterpret_cast<V*>(raw);  // WARPS entries of <= 8 * SCAN_WORDS bytes
  const int lane = (int)(threadIdx.x & 31), warp = (int)(threadIdx.x >> 5);
  const int width = group < 32 ? group : 32;
  const int sub = lane & (width - 1);
  V inc = x;
  for (int d = 1; d < width; d <<= 1) {
    const V o = shfl_up_v(inc, d, width);
    if (sub >= d) inc = op(o, inc);
  }
  V excl = shfl_up_v(inc, 1, width);
  if (sub == 0) excl = id;
  if (group <= 32) {
    // absolute source lane: the last of this thread's segment
    *total = shfl_v(inc, (lane & ~(width - 1)) + width - 1, 32);
    return excl;
  }
  if (lane == 31) warp_buf[warp] = inc;
  __syncthreads();
  const int per_group = group >> 5;
  const int first = warp & ~(per_group - 1);
  V carry = id;
  for (int k = first; k < warp; ++k) carry = op(carry, warp_buf[k]);
  V tot = carry;
  for (int k = warp; k < first + per_group; ++k) tot = op(tot, warp_buf[k]);
  __syncthreads();
  *total = tot;
  return op(carry, excl);
}

// (min of block values, count of block starts): the scan behind the clamp and the block ids.
struct MinCount {
  double v;
  int c;
  int pad;
};
struct MinCountOp {
  __device__ __forceinline__ MinCount operator()(const MinCount& a, const MinCount& b) const {
    MinCount r;
    r.v = dmin(a.v, b.v);
    r.c = a.c + b.c;
    r.pad = 0;
    return r;
  }
};
__device__ __forceinline__ MinCount min_count(double v, int c) {
  MinCount r;
  r.v = v;
  r.c = c;
  r.pad = 0;
  return r;
}

// Whether PAV pools the neighbouring blocks L = [a, m) (value vl) and R = [m, e) (value vr):
// on a violation vl < vr and on equality (the pooled side of a kink), except, with tie keys
// (`keys` not null; indices relative to it), at equality of blocks whose keys are all tied:
// keys[a] == keys[e - 1] (widened through the bits: no flush to zero under -ftz=true).
template <class T>
__device__ __forceinline__ bool pools(double vl, double vr, const T* keys, i64 a, i64 e) {
  if (vl < vr) return true;
  if (!(vl == vr)) return false;
  return keys == nullptr || widen(keys[a]) != widen(keys[e - 1]);
}

struct SumOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a + b; }
};
struct MinOp {
  __device__ __forceinline__ double operator()(double a, double b) const { return dmin(a, b); }
};

// --- forward building blocks (tile-local positions; a tile's arrays in shared memory) -------

// PAV over the chunk [a, e), whose entries' leaf accumulators are staged in acc[a, e): pushes
// each entry as a block and pools while `pools` says so (keys: the tile's tie keys or null).
// The top block stays in registers until the next push; spills go to positions already read.
// Postcondition: the chunk's blocks satisfy the storage invariant (end/begin/acc at their
// extents, end[p] = -1 for every other p in [a, e)) and their values do not increase.
template <class P, class T>
__device__ void chunk_pav(int a, int e, typename P::Acc* acc, int* end, int* begin,
                          const T* keys) {
  typedef Block<typename P::Acc> B;
  if (a >= e) return;
  B cur = make_block<P>(acc[a], 1);
  int cs = a;  // start of cur
  for (int p = a + 1; p < e; ++p) {
    acc[cs] = cur.acc;  // spill the top block (cs < p)
    end[cs] = p;
    begin[p - 1] = cs;
    cur = make_block<P>(acc[p], 1);
    cs = p;
    while (cs > a) {
      const int bs = begin[cs - 1];
      const B below = make_block<P>(acc[bs], cs - bs);
      if (!pools(block_value<P>(below), block_value<P>(cur), keys, bs, p + 1)) break;
      end[cs] = -1;  // cs is no longer a block start
      cur = merge_blocks<P>(below, cur);
      cs = bs;
    }
  }
  acc[cs] = cur.acc;
  end[cs] = e;
  begin[e - 1] = cs;
}

// Pools across the boundary m of two adjacent valid stacks [a, m) and [m, e): the block M
// starting at m grows left while it pools with the block below and right while it pools with
// the block above, until neither holds. Everything else is untouched.
template <class P, class T>
__device__ void merge_pair(int a, int m, int e, typename P::Acc* acc, int* end, int* begin,
                           const T* keys) {
  typedef Block<typename P::Acc> B;
  int ms = m, me = end[m];
  B M = make_block<P>(acc[m], me - m);
  for (;;) {
    while (ms > a) {
      const int ls = begin[ms - 1];
      const B L = make_block<P>(acc[ls], ms - ls);
      if (!pools(block_value<P>(L), block_value<P>(M), keys, ls, me)) break;
      end[ms] = -1;
      M = merge_blocks<P>(L, M);
      ms = ls;
    }
    if (me < e) {
      const int re = end[me];
      const B R = make_block<P>(acc[me], re - me);
      if (pools(block_value<P>(M), block_value<P>(R), keys, ms, re)) {
        end[me] = -1;
        M = merge_blocks<P>(M, R);
        me = re;
        continue;  // M grew: it may now pool with its left neighbour
      }
    }
    break;
  }
  acc[ms] = M.acc;
  end[ms] = me;
  begin[me - 1] = ms;
}

// Coalesced staging of the tile's leaves, chunk PAV, then the tree merge of a group's chunks
// over a tile of `len` entries (keys: the tile's tie keys, or null). Ends with a group barrier:
// afterwards every thread of the group may read the tile's stack. The caller makes sure nobody
// still reads acc/end/begin.
template <class P, class T>
__device__ void tile_pav(const T* s, const T* w, const T* keys, int lane, int group, int items,
                         int len, typename P::Acc* acc, int* end, int* begin) {
  for (int p = lane; p < len; p += group) acc[p] = P::leaf(s[p], w[p]);
  group_sync(group);
  const int a = imin(lane * items, len), e = imin(a + items, len);
  chunk_pav<P>(a, e, acc, end, begin, keys);
  group_sync(group);
  for (int span = 1; span < group; span <<= 1) {
    if ((lane & (2 * span - 1)) == 0) {
      const int lo = lane * items;
      const int mid = lo + span * items;
      if (mid < len) {
        merge_pair<P>(lo, mid, imin(mid + span * items, len), acc, end, begin, keys);
      }
    }
    group_sync(group);
  }
}

// --- forward kernels --------------------------------------------------------------------

// Writes a tile's outputs coalesced: each thread's results for its chunk [a, e) (registers)
// go through the shared arrays sol_s / id_s (which the group no longer reads after the first
// barrier) to the row at stride `group`.
template <class T, int ITEMS>
__device__ __forceinline__ void store_tile(const T (&out_v)[ITEMS], const int (&out_id)[ITEMS],
                                           int a, int e, int lane, int group, int len, T* sol_s,
                                           int* id_s, T* sol_row, int* ids_row) {
  group_sync(group);
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    if (a + k < e) {
      sol_s[a + k] = out_v[k];
      id_s[a + k] = out_id[k];
    }
  }
  group_sync(group);
  for (int p = lane; p < len; p += group) {
    sol_row[p] = sol_s[p];
    ids_row[p] = id_s[p];
  }
}

// Rows of n <= group * items: a group of `group` threads (a power of two <= BLOCK) per row,
// BLOCK / group rows per block.
// s, sol, ids: (rows, n) C-contiguous; w: rows of n at stride w_stride (0: one shared row);
// keys: (rows, n) tie keys, read only when use_keys != 0 (see `pools`).
template <class T, int REG>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
isotonic_fwd_small(const T* __restrict__ s, const T* __restrict__ w, i64 w_stride,
                   const T* __restrict__ keys, int use_keys, T* __restrict__ sol,
                   int* __restrict__ ids, int rows, int n, int group) {
  typedef Pav<REG> P;
  typedef typename P::Acc Acc;
  constexpr int items = P::ITEMS;
  // group g's region of the tile arrays: [g * tile, (g + 1) * tile), tile = group * items
  __shared__ Acc acc_all[BLOCK * items];
  __shared__ int end_all[BLOCK * items];
  __shared__ int begin_all[BLOCK * items];
  __shared__ double scan_raw[WARPS * SCAN_WORDS];
  const int tid = (int)threadIdx.x;
  const int lane = tid & (group - 1), g = tid / group;
  const int tile = group * items;
  Acc* acc = acc_all + g * tile;
  int* end = end_all + g * tile;
  int* begin = begin_all + g * tile;

  const i64 row = (i64)blockIdx.x * (BLOCK / group) + g;
  const bool active = row < rows;
  const int len = active ? n : 0;
  const i64 row_c = active ? row : 0;  // keeps the pointers below inside the arrays
  const T* s_row = s + row_c * n;
  const T* w_row = w + row_c * w_stride;
  T* sol_row = sol + row_c * n;
  int* ids_row = ids + row_c * n;
  const T* keys_row = use_keys ? keys + row_c * n : nullptr;

  tile_pav<P>(s_row, w_row, keys_row, lane, group, items, len, acc, end, begin);

  const int a = imin(lane * items, len), e = imin(a + items, len);
  MinCount agg = min_count(pos_inf(), 0);
  for (int p = a; p < e; ++p) {
    if (end[p] >= 0) agg = MinCountOp()(agg, min_count(P::value(acc[p], end[p] - p), 1));
  }
  MinCount total;
  const MinCount pre =
      group_scan_exclusive(agg, min_count(pos_inf(), 0), group, scan_raw, MinCountOp(), &total);
  double v = pre.v;
  int c = pre.c;
  T out_v[items];
  int out_id[items];
#pragma unroll
  for (int k = 0; k < items; ++k) {
    const int p = a + k;
    if (p < e) {
      if (end[p] >= 0) {
        ++c;
        v = dmin(v, P::value(acc[p], end[p] - p));
      }
      out_v[k] = Narrow<T>::of(v);
      out_id[k] = c - 1;
    }
  }
  store_tile(out_v, out_id, a, e, lane, group, len, reinterpret_cast<T*>(acc), begin, sol_row,
             ids_row);
}

// Rows longer than a tile (BLOCK * items): one row per block at a time, tiles swept left to
// right; `scratch` holds n accumulators per block (gridDim.x * n in all).
template <class T, int REG>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
isotonic_fwd_large(const T* __restrict__ s, const T* __restrict__ w, i64 w_stride,
                   const T* __restrict__ keys, int use_keys, T* __restrict__ sol,
                   int* __restrict__ ids,
                   typename Pav<REG>::Acc* __restrict__ scratch, int rows, int n) {
  typedef Pav<REG> P;
  typedef typename P::Acc Acc;
  typedef Block<Acc> B;
  constexpr int items = P::ITEMS;
  constexpr int tile = BLOCK * items;
  __shared__ Acc acc[tile + 1];
  __shared__ int end[tile];
  __shared__ int begin[tile];
  __shared__ double scan_raw[WARPS * SCAN_WORDS];
  __shared__ int sh[2];  // sh[0]: slot of M, sh[1]: end of M
  const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
  double* val = reinterpret_cast<double*>(acc);  // final pass: tile + 1 block values
  Acc* stack = scratch + (i64)blockIdx.x * n;     // slot k: accumulators; ids_row[k]: start

  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* s_row = s + row * n;
    const T* w_row = w + row * w_stride;
    T* sol_row = sol + row * n;
    int* ids_row = ids + row * n;
    const T* keys_row = use_keys ? keys + row * n : nullptr;  // row positions
    int nb = 0;  // stack size (uniform across the block)

    for (i64 t0 = 0; t0 < n; t0 += tile) {
      const int len = (int)((n - t0) < tile ? (n - t0) : tile);
      const T* keys_tile = use_keys ? keys_row + t0 : nullptr;  // tile positions
      tile_pav<P>(s_row + t0, w_row + t0, keys_tile, tid, BLOCK, items, len, acc, end, begin);

      if (warp == 0) {
        // Pool the tile's bottom block M = [0, me) with the stack (left) and the tile (right).
        int me = end[0];
        B M = make_block<P>(acc[0], me);
        int top = nb - 1;  // stack slots <= top stay below M
        for (;;) {
          while (top >= 0) {
            // lane j looks at slot top - j; P_j pools slots top - j .. top (row order)
            const int k = top - lane;
            const bool valid = k >= 0;
            B Lk = M;
            int start = 0;
            if (valid) {
              start = ids_row[k];
              const int stop = (k + 1 < nb) ? ids_row[k + 1] : (int)t0;
              Lk = make_block<P>(stack[k], stop - start);
            }
            B Pj = Lk;
            for (int d = 1; d < 32; d <<= 1) {
              const B o = shfl_up_v(Pj, d, 32);
              if (lane >= d) Pj = merge_blocks<P>(Pj, o);
            }
            const B Pprev = shfl_up_v(Pj, 1, 32);
            const B Q = lane == 0 ? M : merge_blocks<P>(Pprev, M);  // M after pooling lane slots
            // Q = [start of slot k + 1, t0 + me) in row positions
            const bool pool = valid && pools(block_value<P>(Lk), block_value<P>(Q), keys_row,
                                             (i64)start, t0 + me);
            const unsigned stop_mask = __ballot_sync(FULL, !pool);
            const int npool = stop_mask ? __ffs((int)stop_mask) - 1 : 32;
            if (npool > 0) {
              M = merge_blocks<P>(shfl_v(Pj, npool - 1, 32), M);
              top -= npool;
            }
            if (npool < 32) break;
          }
          if (me < len) {
            const int re = end[me];
            const B R = make_block<P>(acc[me], re - me);
            // M starts at the lowest stack slot it pooled, else at the tile's start
            const i64 ms = top + 1 < nb ? (i64)ids_row[top + 1] : t0;
            if (pools(block_value<P>(M), block_value<P>(R), keys_row, ms, t0 + re)) {
              M = merge_blocks<P>(M, R);
              me = re;
              continue;
            }
          }
          break;
        }
        if (lane == 0) {
          const int slot = top + 1;
          if (slot == nb) ids_row[slot] = (int)t0;  // M starts in this tile
          stack[slot] = M.acc;
          sh[0] = slot;
          sh[1] = me;
        }
      }
      __syncthreads();
      // Append the tile's blocks right of M.
      const int slot_m = sh[0], me = sh[1];
      const int a = imin(tid * items, len), e = imin(a + items, len);
      int cnt = 0;
      for (int p = a; p < e; ++p) cnt += (p >= me && end[p] >= 0) ? 1 : 0;
      int appended;
      int slot = slot_m + 1 + group_scan_exclusive(cnt, 0, BLOCK, scan_raw, SumOp(), &appended);
      for (int p = a; p < e; ++p) {
        if (p >= me && end[p] >= 0) {
          ids_row[slot] = (int)(t0 + p);
          stack[slot] = acc[p];
          ++slot;
        }
      }
      nb = slot_m + 1 + appended;
      __syncthreads();  // the next tile reuses the shared arrays and sh
    }

    // The clamp: slot k's first accumulator word becomes min over slots <= k of their values.
    {
      double carry = pos_inf();
      for (int c0 = 0; c0 < nb; c0 += tile) {
        const int a = imin(c0 + tid * items, nb), e = imin(a + items, nb);
        double m = pos_inf();
        for (int k = a; k < e; ++k) {
          const int stop = k + 1 < nb ? ids_row[k + 1] : n;
          m = dmin(m, P::value(stack[k], stop - ids_row[k]));
        }
        double chunk_min;
        double run = dmin(carry, group_scan_exclusive(m, pos_inf(), BLOCK, scan_raw, MinOp(),
                                                      &chunk_min));
        for (int k = a; k < e; ++k) {
          const int stop = k + 1 < nb ? ids_row[k + 1] : n;
          run = dmin(run, P::value(stack[k], stop - ids_row[k]));
          // clamped values are written only after this thread read its slots; other threads
          // read only their own slots
          reinterpret_cast<double*>(stack + k)[0] = run;
        }
        carry = dmin(carry, chunk_min);
      }
    }
    __syncthreads();

    // Right-to-left output pass. cursor: slot of the block holding the tile's last entry.
    int cursor = nb - 1;
    const i64 tiles = (n + (i64)tile - 1) / tile;
    for (i64 t = tiles - 1; t >= 0; --t) {
      const i64 t0 = t * tile;
      const int len = (int)((n - t0) < tile ? (n - t0) : tile);
      const int a = imin(tid * items, len), e = imin(a + items, len);
      for (int p = a; p < e; ++p) end[p] = 0;  // flags: a block starts here
      __syncthreads();
      // Slots cursor - j, j = 0 .. len (at most len blocks start in the tile, plus the block
      // holding its first entry); all reads happen before this tile's output writes.
      for (int j = tid; j <= len && cursor - j >= 0; j += BLOCK) {
        const int k = cursor - j;
        const int start = ids_row[k];
        val[j] = reinterpret_cast<const double*>(stack + k)[0];
        if (start >= t0) end[start - t0] = 1;
      }
      __syncthreads();
      int cnt = 0;
      for (int p = a; p < e; ++p) cnt += end[p];
      int in_tile;  // blocks starting in the tile
      int c = group_scan_exclusive(cnt, 0, BLOCK, scan_raw, SumOp(), &in_tile);
      const int base = cursor - in_tile;  // slot of the block holding the entry before t0
      T out_v[items];
      int out_id[items];
#pragma unroll
      for (int k = 0; k < items; ++k) {
        const int p = a + k;
        if (p < e) {
          c += end[p];
          out_id[k] = base + c;
          out_v[k] = Narrow<T>::of(val[cursor - out_id[k]]);
        }
      }
      // val (the acc array) becomes the staging area of the solution, begin that of the ids
      store_tile(out_v, out_id, a, e, tid, BLOCK, len, reinterpret_cast<T*>(acc), begin,
                 sol_row + t0, ids_row + t0);
      cursor = base;
      __syncthreads();
    }
  }
}

// --- VJP --------------------------------------------------------------------------------
template <int REG> struct Vjp;

template <> struct Vjp<0> {  // L2: grad_s = mean_B(g), grad_w = -grad_s
  static constexpr int ITEMS = ITEMS_L2;
  struct Acc {
    double sum;
    int count;
    int pad;
  };
  struct Total {
    double mean;
  };
  template <class T>
  static __device__ __forceinline__ Acc leaf(T g, T, T) {
    Acc a;
    a.sum = widen(g);
    a.count = 1;
    a.pad = 0;
    return a;
  }
  static __device__ __forceinline__ Acc merge(const Acc& l, const Acc& r) {
    Acc a;
    a.sum = l.sum + r.sum;
    a.count = l.count + r.count;
    a.pad = 0;
    return a;
  }
  static __device__ __forceinline__ Total finish(const Acc& a) {
    Total t;
    t.mean = a.sum / (double)a.count;
    return t;
  }
  template <class T>
  static __device__ __forceinline__ void grads(const Total& t, T, T, T& gs, T& gw) {
    gs = Narrow<T>::of(t.mean);
    gw = Narrow<T>::of(-t.mean);
  }
};

template <> struct Vjp<1> {  // KL: grad_s = softmax(s_B) sum_B(g), grad_w = -softmax(w_B) sum_B(g)
  static constexpr int ITEMS = ITEMS_KL;
  struct Acc {
    double sg, ms, zs, mw, zw;
  };
  struct Total {
    double fs, ms, fw, mw;  // factor = sum_B(g) / sum_B(exp(x - max)), and the max
  };
  template <class T>
  static __device__ __forceinline__ Acc leaf(T g, T s, T w) {
    Acc a;
    a.sg = widen(g);
    a.ms = widen(s);
    a.zs = 1.0;
    a.mw = widen(w);
    a.zw = 1.0;
    return a;
  }
  static __device__ __forceinline__ Acc merge(const Acc& l, const Acc& r) {
    Acc a;
    a.sg = l.sg + r.sg;
    lse_merge(l.ms, l.zs, r.ms, r.zs, a.ms, a.zs);
    lse_merge(l.mw, l.zw, r.mw, r.zw, a.mw, a.zw);
    return a;
  }
  static __device__ __forceinline__ Total finish(const Acc& a) {
    Total t;
    t.fs = a.sg / a.zs;
    t.ms = a.ms;
    t.fw = a.sg / a.zw;
    t.mw = a.mw;
    return t;
  }
  template <class T>
  static __device__ __forceinline__ void grads(const Total& t, T s, T w, T& gs, T& gw) {
    gs = Narrow<T>::of(exp(widen(s) - t.ms) * t.fs);
    gw = Narrow<T>::of(-(exp(widen(w) - t.mw) * t.fw));
  }
};

static_assert(sizeof(Vjp<0>::Total) == 8, "mirrored as _VJP_TOTAL_BYTES in _cupy.py");
static_assert(sizeof(Vjp<1>::Total) == 32, "mirrored as _VJP_TOTAL_BYTES in _cupy.py");

// Segmented-scan item: head = a run starts inside, heads = number of run starts, n = entries
// (0 only for the identity), acc = accumulators of the last run's part inside.
template <class Acc> struct RunItem {
  Acc acc;
  int head;
  int heads;
  int n;
  int pad;
};
static_assert(sizeof(RunItem<Vjp<1>::Acc>) <= 8 * SCAN_WORDS, "scan scratch too small");

template <class V> struct RunOp {
  typedef RunItem<typename V::Acc> I;
  __device__ __forceinline__ I operator()(const I& a, const I& b) const {
    if (a.n == 0) return b;
    if (b.n == 0) return a;
    I r;
    r.acc = b.head ? b.acc : V::merge(a.acc, b.acc);
    r.head = a.head | b.head;
    r.heads = a.heads + b.heads;
    r.n = a.n + b.n;
    r.pad = 0;
    return r;
  }
};

template <class V>
__device__ __forceinline__ RunItem<typename V::Acc> run_identity() {
  RunItem<typename V::Acc> r;
  r.acc = typename V::Acc();
  r.head = 0;
  r.heads = 0;
  r.n = 0;
  r.pad = 0;
  return r;
}

template <class V, class T>
__device__ __forceinline__ RunItem<typename V::Acc> run_leaf(T g, T s, T w, int head) {
  RunItem<typename V::Acc> r;
  r.acc = V::template leaf<T>(g, s, w);
  r.head = head;
  r.heads = head;
  r.n = 1;
  r.pad = 0;
  return r;
}

// The inputs of entry q of a row: L2 reads neither s nor w.
template <int REG, class T>
__device__ __forceinline__ void load_sw(const T* s_row, const T* w_row, i64 q, T& sv, T& wv) {
  if (REG == 1) {
    sv = s_row[q];
    wv = w_row[q];
  } else {
    sv = (T)0;
    wv = (T)0;
  }
}

// Rows of n <= group * items (see isotonic_fwd_small); run totals in shared memory.
template <class T, int REG>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
isotonic_vjp_small(const T* __restrict__ g, const T* __restrict__ s, const T* __restrict__ w,
                   i64 w_stride, const int* __restrict__ ids, T* __restrict__ grad_s,
                   T* __restrict__ grad_w, int rows, int n, int group) {
  typedef Vjp<REG> V;
  typedef RunItem<typename V::Acc> I;
  typedef typename V::Total Total;
  constexpr int items = V::ITEMS;
  __shared__ Total tot_all[BLOCK * items];  // group gi: run totals by run index
  __shared__ double scan_raw[WARPS * SCAN_WORDS];
  const int tid = (int)threadIdx.x;
  const int lane = tid & (group - 1), gi = tid / group;
  const int tile = group * items;
  Total* tot = tot_all + gi * tile;
  const i64 row = (i64)blockIdx.x * (BLOCK / group) + gi;
  const bool active = row < rows;
  const int len = active ? n : 0;
  const i64 row_c = active ? row : 0;
  const T* g_row = g + row_c * n;
  const T* s_row = s + row_c * n;
  const T* w_row = w + row_c * w_stride;
  const int* id_row = ids + row_c * n;
  T* gs_row = grad_s + row_c * n;
  T* gw_row = grad_w + row_c * n;

  const int a = imin(lane * items, len), e = imin(a + items, len);
  I agg = run_identity<V>();
  for (int p = a; p < e; ++p) {
    T sv, wv;
    load_sw<REG>(s_row, w_row, p, sv, wv);
    const int head = (p == 0 || id_row[p] != id_row[p - 1]) ? 1 : 0;
    agg = RunOp<V>()(agg, run_leaf<V>(g_row[p], sv, wv, head));
  }
  I total;
  I run = group_scan_exclusive(agg, run_identity<V>(), group, scan_raw, RunOp<V>(), &total);
  const int heads_before = run.heads;
  for (int p = a; p < e; ++p) {
    T sv, wv;
    load_sw<REG>(s_row, w_row, p, sv, wv);
    const int head = (p == 0 || id_row[p] != id_row[p - 1]) ? 1 : 0;
    run = RunOp<V>()(run, run_leaf<V>(g_row[p], sv, wv, head));
    if (p == len - 1 || id_row[p + 1] != id_row[p]) tot[run.heads - 1] = V::finish(run.acc);
  }
  group_sync(group);
  int c = heads_before;
  for (int p = a; p < e; ++p) {
    T sv, wv;
    load_sw<REG>(s_row, w_row, p, sv, wv);
    c += (p == 0 || id_row[p] != id_row[p - 1]) ? 1 : 0;
    T gs, gw;
    V::grads(tot[c - 1], sv, wv, gs, gw);
    gs_row[p] = gs;
    gw_row[p] = gw;
  }
}

// Rows longer than a tile: one row per block at a time; `scratch` holds n run totals per block.
template <class T, int REG>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
isotonic_vjp_large(const T* __restrict__ g, const T* __restrict__ s, const T* __restrict__ w,
                   i64 w_stride, const int* __restrict__ ids, T* __restrict__ grad_s,
                   T* __restrict__ grad_w, typename Vjp<REG>::Total* __restrict__ scratch,
                   int rows, int n) {
  typedef Vjp<REG> V;
  typedef RunItem<typename V::Acc> I;
  typedef typename V::Total Total;
  constexpr int items = V::ITEMS;
  constexpr int tile = BLOCK * items;
  __shared__ double scan_raw[WARPS * SCAN_WORDS];
  const int tid = (int)threadIdx.x;
  Total* tot = scratch + (i64)blockIdx.x * n;

  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* g_row = g + row * n;
    const T* s_row = s + row * n;
    const T* w_row = w + row * w_stride;
    const int* id_row = ids + row * n;
    T* gs_row = grad_s + row * n;
    T* gw_row = grad_w + row * n;

    // Pass A: run totals by run index; `carry` is everything left of the tile.
    I carry = run_identity<V>();
    for (i64 t0 = 0; t0 < n; t0 += tile) {
      const int len = (int)((n - t0) < tile ? (n - t0) : tile);
      const int a = imin(tid * items, len), e = imin(a + items, len);
      I agg = run_identity<V>();
      for (int p = a; p < e; ++p) {
        const i64 q = t0 + p;
        T sv, wv;
        load_sw<REG>(s_row, w_row, q, sv, wv);
        const int head = (q == 0 || id_row[q] != id_row[q - 1]) ? 1 : 0;
        agg = RunOp<V>()(agg, run_leaf<V>(g_row[q], sv, wv, head));
      }
      I tile_total;
      I run = RunOp<V>()(carry, group_scan_exclusive(agg, run_identity<V>(), BLOCK, scan_raw,
                                                     RunOp<V>(), &tile_total));
      for (int p = a; p < e; ++p) {
        const i64 q = t0 + p;
        T sv, wv;
        load_sw<REG>(s_row, w_row, q, sv, wv);
        const int head = (q == 0 || id_row[q] != id_row[q - 1]) ? 1 : 0;
        run = RunOp<V>()(run, run_leaf<V>(g_row[q], sv, wv, head));
        if (q == n - 1 || id_row[q + 1] != id_row[q]) tot[run.heads - 1] = V::finish(run.acc);
      }
      carry = RunOp<V>()(carry, tile_total);
    }
    __syncthreads();  // the totals are visible to the whole block

    // Pass B: every entry reads its run's total.
    int heads_carry = 0;
    for (i64 t0 = 0; t0 < n; t0 += tile) {
      const int len = (int)((n - t0) < tile ? (n - t0) : tile);
      const int a = imin(tid * items, len), e = imin(a + items, len);
      int cnt = 0;
      for (int p = a; p < e; ++p) {
        const i64 q = t0 + p;
        cnt += (q == 0 || id_row[q] != id_row[q - 1]) ? 1 : 0;
      }
      int tile_heads;
      int c = heads_carry + group_scan_exclusive(cnt, 0, BLOCK, scan_raw, SumOp(), &tile_heads);
      for (int p = a; p < e; ++p) {
        const i64 q = t0 + p;
        T sv, wv;
        load_sw<REG>(s_row, w_row, q, sv, wv);
        c += (q == 0 || id_row[q] != id_row[q - 1]) ? 1 : 0;
        T gs, gw;
        V::grads(tot[c - 1], sv, wv, gs, gw);
        gs_row[q] = gs;
        gw_row[q] = gw;
      }
      heads_carry += tile_heads;
    }
    __syncthreads();  // the next row rewrites the totals
  }
}

}  // namespace sg_iso
