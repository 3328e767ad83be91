// Shared device code of sortgrad's CUDA kernels: integer types, the two key orders, composite
// (key, index) items, warp shuffles of items and block-wide scans.
//
// No system or toolkit headers: NVRTC compiles this with nothing but CuPy's bundled CCCL on the
// include path, and the tests' host emulator (tests/_emulation/sortgrad_emulation.cuh, not
// shipped) compiles it as plain C++ with SG_HOST_EMULATION defined.
// 16-bit floats are handled as raw bits (no cuda_fp16.h).
//
// Keys (see sortgrad/kernels/_keys.py, the CPU reference): unsigned comparison of the key gives
// the order, equal keys are ties of the order.
//   MODE_SORT_ASC / MODE_SORT_DESC: the order of jnp.sort -- -0.0 == +0.0, subnormals compare as
//     zero except for float16 (kept), every NaN equal to every other NaN and above +inf;
//     descending is the complement of the ascending key.
//   MODE_TOPK: the complement of IEEE totalOrder (-NaN < -inf < ... < -0.0 < +0.0 < ... < +NaN),
//     so the smallest key is the largest value: top-k takes the k smallest composites.
// A composite item is (key, column); columns are unique within a row, so items are totally
// ordered and every sorting network or merge on them is stable and deterministic.
#pragma once

#if defined(SG_HOST_EMULATION)
#define SG_LAUNCH_BOUNDS(threads)
#else
#define SG_LAUNCH_BOUNDS(threads) __launch_bounds__(threads)
#endif

namespace sg {

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP = 32;

// dtype kinds, as in _keys.py
enum { KIND_UNSIGNED = 0, KIND_SIGNED = 1, KIND_FLOAT = 2 };
// key orders
enum { MODE_SORT_ASC = 0, MODE_SORT_DESC = 1, MODE_TOPK = 2 };

// Float layouts by bit width: the bits of +inf, and the bits of the smallest normal number
// (magnitudes below it are flushed to zero in sort order; 0: nothing flushed, as for float16).
template <class B> struct FloatBits;
template <> struct FloatBits<u8> {
  static constexpr u8 inf = 0, smallest_normal = 0;  // no 8-bit floats
};
template <> struct FloatBits<u16> {
  static constexpr u16 inf = 0x7C00u, smallest_normal = 0;
};
template <> struct FloatBits<u32> {
  static constexpr u32 inf = 0x7F800000u, smallest_normal = 0x00800000u;
};
template <> struct FloatBits<u64> {
  static constexpr u64 inf = 0x7FF0000000000000ull, smallest_normal = 0x0010000000000000ull;
};

// The key of one element from its raw bits. `kind` and `mode` are uniform across a launch.
template <class B>
__device__ __forceinline__ B make_key(B bits, int kind, int mode) {
  const B sign = (B)((B)1 << (sizeof(B) * 8 - 1));
  B key;
  if (kind == KIND_FLOAT) {
    const B magnitude = (B)(bits & (B)~sign);
    if (mode != MODE_TOPK && magnitude > FloatBits<B>::inf) {
      key = (B)~(B)0;  // NaN: one key above +inf
    } else if (mode != MODE_TOPK &&
               (magnitude == 0 || magnitude < FloatBits<B>::smallest_normal)) {
      key = sign;  // zeros and flushed subnormals: the key of +0.0
    } else {
      // negative: complement (reverses the magnitude order); positive: set the sign bit
      key = (bits & sign) ? (B)~bits : (B)(bits | sign);
    }
  } else if (kind == KIND_SIGNED) {
    key = (B)(bits ^ sign);
  } else {
    key = bits;
  }
  return mode == MODE_SORT_ASC ? key : (B)~key;
}

// --- composite items -------------------------------------------------------------------------
// Keys of up to 32 bits: one u64, key << 32 | column. 64-bit keys: a struct compared
// lexicographically. item_max() sorts after every real item (real columns are < 2^31).
struct Wide {
  u64 key;
  u32 idx;
  u32 pad;
};

__device__ __forceinline__ bool item_less(u64 a, u64 b) { return a < b; }
__device__ __forceinline__ bool item_less(const Wide& a, const Wide& b) {
  return a.key < b.key || (a.key == b.key && a.idx < b.idx);
}
__device__ __forceinline__ u32 item_idx(u64 a) { return (u32)a; }
__device__ __forceinline__ u32 item_idx(const Wide& a) { return a.idx; }
__device__ __forceinline__ u64 item_key(u64 a) { return a >> 32; }
__device__ __forceinline__ u64 item_key(const Wide& a) { return a.key; }

template <class B> struct ItemOf {
  typedef u64 type;
  static __device__ __forceinline__ u64 make(B key, u32 idx) { return ((u64)key << 32) | idx; }
  static __device__ __forceinline__ u64 max() { return ~0ull; }
};
template <> struct ItemOf<u64> {
  typedef Wide type;
  static __device__ __forceinline__ Wide make(u64 key, u32 idx) {
    Wide w;
    w.key = key;
    w.idx = idx;
    w.pad = 0;
    return w;
  }
  static __device__ __forceinline__ Wide max() { return make(~0ull, ~0u); }
};

// Warp shuffles of items (every lane of the warp must take part).
__device__ __forceinline__ u64 shfl_xor_item(u64 v, int lane_mask) {
  return __shfl_xor_sync(FULL_MASK, v, lane_mask);
}
__device__ __forceinline__ Wide shfl_xor_item(const Wide& v, int lane_mask) {
  Wide o;
  o.key = __shfl_xor_sync(FULL_MASK, v.key, lane_mask);
  o.idx = __shfl_xor_sync(FULL_MASK, v.idx, lane_mask);
  o.pad = 0;
  return o;
}
__device__ __forceinline__ u64 shfl_item(u64 v, int src_lane) {
  return __shfl_sync(FULL_MASK, v, src_lane);
}
__device__ __forceinline__ Wide shfl_item(const Wide& v, int src_lane) {
  Wide o;
  o.key = __shfl_sync(FULL_MASK, v.key, src_lane);
  o.idx = __shfl_sync(FULL_MASK, v.idx, src_lane);
  o.pad = 0;
  return o;
}
__device__ __forceinline__ u64 shfl_up_item(u64 v, int delta) {
  return __shfl_up_sync(FULL_MASK, v, delta);
}
__device__ __forceinline__ Wide shfl_up_item(const Wide& v, int delta) {
  Wide o;
  o.key = __shfl_up_sync(FULL_MASK, v.key, delta);
  o.idx = __shfl_up_sync(FULL_MASK, v.idx, delta);
  o.pad = 0;
  return o;
}

template <class T>
__device__ __forceinline__ T smin(T a, T b) {
  return b < a ? b : a;
}
template <class T>
__device__ __forceinline__ T smax(T a, T b) {
  return a < b ? b : a;
}

__device__ __forceinline__ int lane_id() { return (int)(threadIdx.x & (WARP - 1)); }
__device__ __forceinline__ int warp_id() { return (int)(threadIdx.x / WARP); }

// Inclusive sum over the lanes of a warp.
__device__ __forceinline__ int warp_inclusive_sum(int x) {
  const int lane = lane_id();
#pragma unroll
  for (int d = 1; d < WARP; d <<= 1) {
    const int y = __shfl_up_sync(FULL_MASK, x, d);
    if (lane >= d) x += y;
  }
  return x;
}

// Inclusive sum over a block of WARPS warps (every thread of the block must call it). `scratch`
// holds at least WARPS ints of shared memory; it is free again when this returns. `total` gets
// the block's sum.
template <int WARPS>
__device__ __forceinline__ int block_inclusive_sum(int x, int* scratch, int& total) {
  const int inclusive = warp_inclusive_sum(x);
  if (lane_id() == WARP - 1) scratch[warp_id()] = inclusive;
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int t = scratch[w];
    before += (w < warp_id()) ? t : 0;
    sum += t;
  }
  __syncthreads();
  total = sum;
  return before + inclusive;
}

// Exclusive rank of a 1-bit flag among the threads of a block in thread order, and the block's
// count (every thread of the block must call it; `scratch`: WARPS ints of shared memory).
template <int WARPS>
__device__ __forceinline__ int block_flag_rank(bool flag, int* scratch, int& total) {
  const unsigned ballot = __ballot_sync(FULL_MASK, flag);
  const int lane = lane_id();
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) scratch[warp_id()] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int t = scratch[w];
    before += (w < warp_id()) ? t : 0;
    sum += t;
  }
  __syncthreads();
  total = sum;
  return before + in_warp;
}

}  // namespace sg
