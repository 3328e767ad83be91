// The fused elementwise kernels and the per-row fallback of the soft ops (soft rank, soft sort,
// soft top-k mask) for the CuPy backend (sortgrad/kernels/soft/_cupy.py compiles this file with
// NVRTC). The ops are compositions; the math is that of soft/_cpu.py, the reference, and every
// intermediate is float64:
//   forward:  soft_keys -> segmented sort of the keys -> soft_fwd_prep -> isotonic PAV ->
//             soft_extents -> soft_mid -> isotonic VJP (the block sums) -> soft_finish
//             -> soft_fallback (rank and mask rows outside the fast path)
//   backward: [soft_extents (KL rank)] -> soft_vjp_prep -> isotonic VJP -> soft_finish
//
// Sort keys. The PAV needs each row's values sorted in IEEE total order, subnormals included
// (x / eps of a subnormal x need not be small); the sort order of `sort` folds subnormals into
// +0.0. soft_keys builds total-order keys from the bits (immune to CuPy's -ftz=true): negative
// values complemented, positive ones with the sign bit set; the descending key is the
// complement. The segmented sort sorts them as unsigned integers; soft_fwd_prep decodes the
// sorted keys back into the values (-0.0 < +0.0 there, which is harmless: equal values).
//
// Exact limits (DESIGN.md "Numerics"). Every output is written per PAV block B = [p, q)
// (sorted order) relative to the block, so that nothing cancels:
//   L2 rank   r_i = clip((s_i - s_p) - mean(s_B - s_p) + mean(rho_B), 1, n)
//   mask      m_i = clip((s_i - s_p) - mean(s_B - s_p) + mean(w_B), 0, 1)
//   KL rank   r_i = clip(softmax(s_B)_i * sum(rho_B), 1, n)
//   L2 sort   out_i = clip(mean(x_B) + (centre_B - i) / eps, min x, max x)
//   KL sort   out_i = lse(x_B) - (i - p) / eps - log sum_{j < |B|} exp(-j / eps)
// where s is the sorted signed x / eps, x the sorted signed input; a singleton block gives
// rho_i, w_i or the input value itself exactly. mean(rho_B), mean(w_B), centre_B are closed
// forms of p and q; the block sums (mean(s_B - s_p), mean(x_B), the softmaxes) come from the
// isotonic VJP kernels on the block ids (soft_mid builds their inputs), and each entry finds
// its block's extent through soft_extents (start_of[id] = p: the block ids number the
// contiguous runs 0, 1, ... from the left).
//
// Units. Rank and mask rows with |s| <= FAST_SCALE at both ends (the fast path, the common
// one) run the PAV on s directly. Other rows (x / eps huge or overflowing) are flagged (2) and
// redone by soft_fallback, one thread per row: the row splits at the gaps of the sorted row
// that no block can cross (x_i - x_{i+1} > G eps, G = n + 1 for L2 ranks, log n + 1 for KL, 2
// for the mask) and each segment runs its PAV on (x - x_a) / eps, as _cpu._segmented. The
// soft sort picks its units in soft_fwd_prep: theta - s on ordinary rows, rho - eps s where
// n / eps > BIG_X, (theta - s) 2^-128 where |x| > BIG_X (L2; KL: theta shifted by -rho_0 /
// eps).
//
// Launch mapping of the elementwise kernels: blocks of BLOCK = 256 threads. Rows of n <= STAGE
// (= BLOCK * ITEMS = 2048) entries: a block takes `rpb` = STAGE / n whole rows (rpb * n <=
// STAGE entries, flat index p over them, so loads and stores are coalesced); scatters and
// gathers through the sorting permutation go through a shared-memory stage of the block's
// rows. Longer rows: one block per row (rpb = 1), direct gathers / scatters in global memory.
// `rpb` is uniform per launch, every thread takes part in every barrier. soft_keys,
// soft_extents and soft_mid are flat grid-stride loops; soft_fallback takes one thread per row.
//
// Per-row flag (prep): bit 0: a non-finite entry (every output entry NaN, block ids 0); bit 1:
// rank / mask: the row takes the fallback; soft sort: |x| > BIG_X somewhere in the row.
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
typedef unsigned int u32;
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

constexpr double FAST_SCALE = 0x1p40;  // rank / mask fast path: |s| <= this at both row ends
constexpr double BIG_X = 0x1p900;      // the soft sort's ordinary units: |x|, n / eps below this
constexpr double DOWN = 0x1p-128;      // the soft sort's scale where |x| > BIG_X
constexpr double SUM_DOWN = 0x1p-64;   // block means of x where |x| > BIG_X: no overflow

// Modes, mirrored in _device_plan.py.
// soft_fwd_prep: a = the isotonic s-argument; b = the sorted signed input (always); wrow = the
// shared w-argument row
enum {
  PREP_RANK_L2 = 0,  // a = scale * x_sorted, wrow = rho
  PREP_RANK_KL = 1,  // a = scale * x_sorted, wrow = log rho
  PREP_SORT_L2 = 2,  // a = theta - b (in the row's units), b = sign * x_sorted (tie keys)
  PREP_SORT_KL = 3,  // a = theta (in the row's units), b = sign * x_sorted (w-argument, keys)
  PREP_MASK = 4,     // a = x_sorted / eps, wrow = (1, .., 1, 0, .., 0) with k ones
};
// soft_vjp_prep: a = the isotonic VJP's cotangent, s = its s-argument (KL)
enum {
  VJP_RANK_L2 = 0,  // a = g[perm]
  VJP_RANK_KL = 1,  // a = g[perm] * ranks[perm], s = (x[perm] - x[perm[p]]) * scale (block B)
  VJP_SORT_L2 = 2,  // a = g
  VJP_SORT_KL = 3,  // a = g, s = sign * x[perm]
};
// soft_finish: the values written (see "Exact limits"); t = the VJP's block sums (forward) or
// the isotonic VJP (backward)
enum {
  FIN_RANK_L2 = 0,   // out[perm] = L2 rank
  FIN_RANK_KL = 1,   // out[perm] = KL rank (t: softmax(s_B) * sum(rho_B))
  FIN_MASK = 2,      // out[perm] = mask
  FIN_SORT = 3,      // out = sign * L2 sort         (sorted order: no scatter)
  FIN_VJP_RANK = 4,  // out[perm] = (a - t) * scale
  FIN_VJP_SORT = 5,  // out[perm] = t
  FIN_SORT_KL = 6,   // out = sign * KL sort          (sorted order: no scatter)
};

__device__ __forceinline__ double nan_d() { return bits_as<double>(0x7ff8000000000000ull); }

__device__ __forceinline__ bool finite(double v) {
  return (bits_as<u64>(v) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}

constexpr double DBL_MAX_D = 0x1.fffffffffffffp1023;

__device__ __forceinline__ double dabs(double v) {
  return bits_as<double>(bits_as<u64>(v) & 0x7fffffffffffffffull);
}

// min(max(v, lo), hi) as the CPU computes it.
__device__ __forceinline__ double clip(double v, double lo, double hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// (xs - base) / eps without overflowing where the quotient is finite (as _cpu._relative).
__device__ __forceinline__ double relative(double xs, double base, double eps) {
  const double d = xs - base;
  if (finite(d)) return d / eps;
  return ((0.5 * xs - 0.5 * base) / eps) * 2.0;
}

// (xs - base) * inv_eps without overflowing where the product is finite.
__device__ __forceinline__ double relative_scaled(double xs, double base, double inv_eps) {
  const double d = xs - base;
  if (finite(d)) return d * inv_eps;
  return ((0.5 * xs - 0.5 * base) * inv_eps) * 2.0;
}

// v / eps through 1 / eps where that is finite (as _cpu._over_eps).
__device__ __forceinline__ double over_eps(double v, double eps, double inv_eps) {
  return finite(inv_eps) ? v * inv_eps : v / eps;
}

// --- total-order keys (bits only) ---------------------------------------------------------------
template <class T> struct KeyOf;
template <> struct KeyOf<float> {
  typedef u32 type;
  static constexpr u32 sign = 0x80000000u;
};
template <> struct KeyOf<double> {
  typedef u64 type;
  static constexpr u64 sign = 0x8000000000000000ull;
};

template <class T>
__device__ __forceinline__ typename KeyOf<T>::type total_key(T v, int descending) {
  typedef typename KeyOf<T>::type K;
  const K b = bits_as<K>(v);
  const K key = (b & KeyOf<T>::sign) ? (K)~b : (K)(b | KeyOf<T>::sign);
  return descending ? (K)~key : key;
}

template <class T>
__device__ __forceinline__ double from_key(typename KeyOf<T>::type key, int descending) {
  typedef typename KeyOf<T>::type K;
  const K k = descending ? (K)~key : key;
  const K b = (k & KeyOf<T>::sign) ? (K)(k ^ KeyOf<T>::sign) : (K)~k;
  return widen(bits_as<T>(b));
}

// keys[q] = the total-order key of x[q] (complemented when descending), q < total.
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_keys(const T* __restrict__ x, typename KeyOf<T>::type* __restrict__ keys, i64 total,
          int descending) {
  for (i64 q = (i64)blockIdx.x * BLOCK + threadIdx.x; q < total; q += (i64)gridDim.x * BLOCK) {
    keys[q] = total_key(x[q], descending);
  }
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

// --- forward: sorted keys -> isotonic inputs ----------------------------------------------------
// `sorted`: the rows' keys sorted ascending (descending_keys: the keys were complemented);
// sign: +-1, the sign that makes b = sign * x_sorted descending; scale: the rank / mask scale
// (sign / eps); eps, inv_eps = 1 / eps.
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_fwd_prep(const typename KeyOf<T>::type* __restrict__ sorted, int descending_keys,
              double* __restrict__ a, double* __restrict__ b, double* __restrict__ wrow,
              int* __restrict__ flag, int rows, int n, int rpb, int mode, double sign,
              double scale, double eps, double inv_eps, int k) {
  __shared__ int bad[STAGE];  // per local row (rpb <= STAGE)
  const int tid = (int)threadIdx.x;
  const Rows blk = block_rows(rows, n, rpb);
  const i64 off = blk.r0 * n;
  const bool sort = mode == PREP_SORT_L2 || mode == PREP_SORT_KL;
  const bool tiny_eps = !((double)n * inv_eps <= BIG_X);  // uniform
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
  // bit 1 of the flags from the row's ends (the row is sorted)
  for (int q = tid; q < blk.nr; q += BLOCK) {
    const i64 r = off + (i64)q * n;
    const double first = sign * from_key<T>(sorted[r], descending_keys);
    const double last = sign * from_key<T>(sorted[r + n - 1], descending_keys);
    int f = 0;
    if (sort) {
      f = (dabs(first) <= BIG_X && dabs(last) <= BIG_X) ? 0 : 2;
    } else {
      const double s0 = first * dabs(scale), s1 = last * dabs(scale);
      f = (dabs(s0) <= FAST_SCALE && dabs(s1) <= FAST_SCALE) ? 0 : 2;
    }
    bad[q] = f;
  }
  __syncthreads();
  for (i64 p = tid; p < blk.total; p += BLOCK) {
    const int lr = (int)(p / n);
    const int i = (int)(p - (i64)lr * n);
    const double x = from_key<T>(sorted[off + p], descending_keys);
    if (!finite(x)) bad[lr] |= 1;  // benign race: every writer sets the same bit
    const double xs = sign * x;
    const bool other_units = (bad[lr] & 2) != 0 || tiny_eps;
    double av;
    if (mode == PREP_SORT_L2) {
      if (tiny_eps) av = (double)(n - i) - eps * xs;
      else if (bad[lr] & 2) av = (double)(n - i) * (inv_eps * DOWN) - xs * DOWN;
      else av = (double)(n - i) * inv_eps - xs;
    } else if (mode == PREP_SORT_KL) {
      av = other_units ? -((double)i / eps) : (double)(n - i) * inv_eps;
    } else {
      av = x * scale;
    }
    a[off + p] = av;
    b[off + p] = xs;
  }
  __syncthreads();
  for (int q = tid; q < blk.nr; q += BLOCK) flag[blk.r0 + q] = bad[q];
}

// --- block extents ------------------------------------------------------------------------------
// start_of[row * n + id] = the first position of the block `id` of the row (ids: the runs of a
// row numbered 0, 1, ... from the left; out-of-range ids are skipped, memory safety only).
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_extents(const int* __restrict__ ids, int* __restrict__ start_of, int rows, int n) {
  const i64 total = (i64)rows * n;
  for (i64 q = (i64)blockIdx.x * BLOCK + threadIdx.x; q < total; q += (i64)gridDim.x * BLOCK) {
    const i64 r = q / n;
    const int i = (int)(q - r * n);
    const int id = ids[q];
    if ((i == 0 || ids[q - 1] != id) && id >= 0 && id < n) start_of[r * n + id] = i;
  }
}

// The extent [p, q) of the block of entry i of row r (whose ids start at ids_row).
__device__ __forceinline__ void extent(const int* ids_row, const int* start_row, int n, int i,
                                       int& p, int& q) {
  const int id = ids_row[i];
  const bool ok = id >= 0 && id < n;
  p = ok ? start_row[id] : i;
  q = (!ok || id == ids_row[n - 1] || id + 1 >= n) ? n : start_row[id + 1];
  if (p < 0 || p > i) p = i;  // memory safety only
  if (q <= i || q > n) q = n;
}

// --- the inputs of the block sums ---------------------------------------------------------------
// g (the isotonic VJP's cotangent over the block ids): rank L2 / mask: s_i - s_p; KL rank: rho;
// L2 sort: x_i - x_p (rows with |x| > BIG_X: x_i 2^-64); KL sort: 1, with the VJP's s- and
// w-arguments s2 = x_i - x_p and w2 = -(i - p) / eps: both softmax sums come from one kernel in
// one order, so that where x_i - x_p == -(i - p) / eps (evenly spaced data at a kink) the two
// logs cancel exactly, as on the CPU.
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_mid(const double* __restrict__ a, const double* __restrict__ b, const int* __restrict__ ids,
         const int* __restrict__ start_of, const int* __restrict__ flag,
         double* __restrict__ g, double* __restrict__ s2, double* __restrict__ w2, int rows,
         int n, int mode, double eps, double inv_eps) {
  const i64 total = (i64)rows * n;
  for (i64 q = (i64)blockIdx.x * BLOCK + threadIdx.x; q < total; q += (i64)gridDim.x * BLOCK) {
    const i64 r = q / n;
    const int i = (int)(q - r * n);
    const i64 off = r * n;
    int p, e;
    extent(ids + off, start_of + off, n, i, p, e);
    double v;
    switch (mode) {
      case PREP_RANK_L2:
      case PREP_MASK: v = a[q] - a[off + p]; break;
      case PREP_RANK_KL: v = (double)(n - i); break;
      case PREP_SORT_L2: v = (flag[r] & 2) ? b[q] * SUM_DOWN : b[q] - b[off + p]; break;
      default: {  // PREP_SORT_KL
        v = 1.0;
        const double d = b[q] - b[off + p];
        // a difference past the range: the most negative double (exp gives 0; -inf would
        // make exp(-inf - -inf) = NaN in the max-shifted sums)
        s2[q] = finite(d) ? d : -DBL_MAX_D;
        w2[q] = -over_eps((double)(i - p), eps, inv_eps);
        break;
      }
    }
    g[q] = finite(v) ? v : 0.0;  // fallback and non-finite rows: anything finite
  }
}

// --- backward: cotangent and residuals -> the isotonic VJP's inputs -----------------------------
// start_of: the block starts (soft_extents of block_ids), read for VJP_RANK_KL only.
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_vjp_prep(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ ranks,
              const int* __restrict__ perm, const int* __restrict__ ids,
              const int* __restrict__ start_of, double* __restrict__ a, double* __restrict__ s,
              int* __restrict__ flag, int rows, int n, int rpb, int mode, double scale) {
  __shared__ double stage[STAGE];
  __shared__ int bad[STAGE];
  const int tid = (int)threadIdx.x;
  const Rows blk = block_rows(rows, n, rpb);
  const i64 off = blk.r0 * n;
  const bool staged = n <= STAGE;  // uniform: then blk.total <= STAGE
  const bool rank = mode == VJP_RANK_L2 || mode == VJP_RANK_KL;
  const bool kl = mode == VJP_RANK_KL || mode == VJP_SORT_KL;
  const double sign = scale < 0.0 ? -1.0 : 1.0;
  const double inv_eps = scale * sign;  // VJP_RANK_KL: scale = sign / eps
  for (int q = tid; q < blk.nr; q += BLOCK) bad[q] = 0;
  __syncthreads();
  // chunks of STAGE entries (one chunk when staged); each thread owns entries base + tid + c B
  for (i64 base = 0; base < blk.total; base += STAGE) {
    int lr[ITEMS], j[ITEMS], jp[ITEMS];
    double sv[ITEMS], av[ITEMS];
#pragma unroll
    for (int c = 0; c < ITEMS; ++c) {
      const i64 p = base + tid + (i64)c * BLOCK;
      lr[c] = -1;
      j[c] = -1;
      jp[c] = -1;
      sv[c] = 0.0;
      av[c] = 0.0;
      if (p < blk.total) {
        lr[c] = (int)(p / n);
        const int t = perm[off + p];
        j[c] = (t >= 0 && t < n) ? t : -1;  // out-of-range entries read as NaN (memory safety)
        if (mode == VJP_RANK_KL) {
          const i64 ro = off + (i64)lr[c] * n;
          int bp, bq;
          extent(ids + ro, start_of + ro, n, (int)(p - (i64)lr[c] * n), bp, bq);
          const int tp = perm[ro + bp];
          jp[c] = (tp >= 0 && tp < n) ? tp : -1;
        }
      }
    }
    if (staged) stage_rows(x + off, stage, blk.total);
#pragma unroll
    for (int c = 0; c < ITEMS; ++c) {
      if (lr[c] >= 0) {
        const double xv = j[c] >= 0 ? fetch(x + off, stage, staged, lr[c], n, j[c]) : nan_d();
        if (!finite(xv)) bad[lr[c]] = 1;
        if (mode == VJP_RANK_KL) {
          // softmax(s_B) is shift-free: s relative to the block's first entry
          const double xp = jp[c] >= 0 ? fetch(x + off, stage, staged, lr[c], n, jp[c]) : nan_d();
          sv[c] = relative_scaled(sign * xv, sign * xp, inv_eps);
        } else {
          sv[c] = xv * scale;
        }
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
        if (kl) s[off + p] = finite(sv[c]) ? sv[c] : 0.0;  // NaN rows: finite, unused
      }
    }
  }
  __syncthreads();
  for (int q = tid; q < blk.nr; q += BLOCK) flag[blk.r0 + q] = bad[q];
}

// --- the outputs --------------------------------------------------------------------------------
// out (and, with `ids`, block ids 0 on non-finite rows) from a (prep's s-argument; KL sort: the
// block sums' grad_w; backward: the VJP prep's cotangent), b (the sorted signed input), t (the
// block sums or the isotonic VJP), the
// block ids and start_of (forward only); scattered through perm except for the soft sort.
// Non-finite rows are NaN at every position (written without perm); rank and mask rows of the
// fallback are left to soft_fallback.
template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_finish(const double* __restrict__ a, const double* __restrict__ b,
            const double* __restrict__ t, const int* __restrict__ perm,
            const int* __restrict__ flag, const int* __restrict__ start_of,
            T* __restrict__ out, int* __restrict__ ids, int write_ids, int rows, int n, int rpb,
            int mode, double scale, double eps, double inv_eps, int k) {
  __shared__ double stage_raw[STAGE];  // staged output rows (as T)
  T* stage = reinterpret_cast<T*>(stage_raw);
  const int tid = (int)threadIdx.x;
  const Rows blk = block_rows(rows, n, rpb);
  const i64 off = blk.r0 * n;
  const bool staged = n <= STAGE;
  const bool sorted_order = mode == FIN_SORT || mode == FIN_SORT_KL;
  const bool scatter = !sorted_order;
  const bool forward = mode <= FIN_SORT || mode == FIN_SORT_KL;
  for (i64 p = tid; p < blk.total; p += BLOCK) {
    const int lr = (int)(p / n);
    const int i = (int)(p - (i64)lr * n);
    const int f = flag[blk.r0 + lr];
    const i64 ro = off + (i64)lr * n;
    if (f & 1) {
      if (write_ids) ids[off + p] = 0;
      const T v = Narrow<T>::of(nan_d());
      if (staged && scatter) stage[p] = v;
      else out[off + p] = v;
      continue;
    }
    if (f & 2 && (mode == FIN_RANK_L2 || mode == FIN_RANK_KL || mode == FIN_MASK)) {
      if (staged) stage[p] = Narrow<T>::of(nan_d());  // soft_fallback writes the row
      continue;
    }
    int bp = i, bq = i + 1;
    if (forward) extent(ids + ro, start_of + ro, n, i, bp, bq);
    const int cnt = bq - bp;
    double v;
    switch (mode) {
      case FIN_RANK_L2:
      case FIN_MASK: {
        const double mw = mode == FIN_RANK_L2
                              ? (double)n - 0.5 * (double)(bp + bq - 1)
                              : (double)sg::smax((bq < k ? bq : k) - bp, 0) / (double)cnt;
        const double lo = mode == FIN_RANK_L2 ? 1.0 : 0.0;
        const double hi = mode == FIN_RANK_L2 ? (double)n : 1.0;
        v = cnt == 1 ? clip(mw, lo, hi)
                     : clip(((a[off + p] - a[ro + bp]) - t[off + p]) + mw, lo, hi) + 0.0;
        break;
      }
      case FIN_RANK_KL: v = cnt == 1 ? (double)(n - i) : clip(t[off + p], 1.0, (double)n); break;
      case FIN_SORT: {
        if (cnt == 1) {
          v = scale * b[off + p];
          break;
        }
        const double mean = (f & 2) ? t[off + p] * (1.0 / SUM_DOWN) : b[ro + bp] + t[off + p];
        const double centre = 0.5 * (double)(bp + bq - 1);
        v = scale * clip(mean + over_eps(centre - (double)i, eps, inv_eps), b[ro + n - 1],
                         b[ro]) + 0.0;
        break;
      }
      case FIN_SORT_KL: {
        if (cnt == 1) {
          v = scale * b[off + p];
          break;
        }
        // t_p = softmax(x_B)_p |B| = |B| / z, z = sum exp(x_B - x_p) (x_p is the block max);
        // a_p = -|B| / zt, zt = sum_j exp(-j / eps) (soft_mid's w2)
        const double z = (double)cnt / t[ro + bp];
        const double zt = (double)cnt / -a[ro + bp];
        const double lse = b[ro + bp] + log(z);
        v = scale * (lse + (-over_eps((double)(i - bp), eps, inv_eps) - log(zt))) + 0.0;
        break;
      }
      case FIN_VJP_RANK: v = (a[off + p] - t[off + p]) * scale; break;
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

// --- the per-row fallback (rank and mask rows whose x / eps leaves the fast path) --------------
// One thread per row, rows whose flag is exactly 2; as _cpu._segmented: segments at the gaps
// no block can cross, each segment's PAV on s = (x - x_a) / eps (written over a), the outputs
// per block (see "Exact limits"). Scratch per row: the stack's block sums (st0; KL: max s) and
// KL's shifted exp sums (st1) at the segment's slots, its counts in ids (block ids written
// over them right to left: slot j <= the start of block j).
// kind: FB_RANK_L2, FB_RANK_KL, FB_MASK.
enum { FB_RANK_L2 = 0, FB_RANK_KL = 1, FB_MASK = 2 };

// KL block value of [p, q) (max-shifted sum (ms, zs) of exp(s_B)) against w = log rho, whose
// max is log(n - p) and max-shifted sum sum(rho_B) / (n - p), as _cpu.kl_value.
__device__ __forceinline__ double kl_rho_value(double ms, double zs, int n, int p, int q) {
  if (q - p == 1) return ms - log((double)(n - p));  // zs == 1: s - w exactly
  const double rp = (double)(n - p);
  const double sum_rho = (double)(q - p) * ((double)n - 0.5 * (double)(p + q - 1));
  return (ms - log(rp)) + (log(zs) - log(sum_rho / rp));
}

// out[perm[i]] = v (out-of-range perm entries skipped: memory safety only).
template <class T>
__device__ __forceinline__ void put(T* out, const int* perm, int n, int i, double v) {
  const int dst = perm[i];
  if (dst >= 0 && dst < n) out[dst] = Narrow<T>::of(v);
}

template <class T>
__global__ void SG_LAUNCH_BOUNDS(BLOCK)
soft_fallback(const double* __restrict__ xs_all, double* __restrict__ s_all,
              double* __restrict__ st0_all, double* __restrict__ st1_all,
              const int* __restrict__ perm_all, const int* __restrict__ flag,
              T* __restrict__ out_all, int* __restrict__ ids_all, int rows, int n, int kind,
              int k, double eps) {
  const i64 row = (i64)blockIdx.x * BLOCK + threadIdx.x;
  if (row >= rows || flag[row] != 2) return;
  const i64 off = row * n;
  const double* xs = xs_all + off;
  double* s = s_all + off;
  double* st0 = st0_all + off;
  double* st1 = st1_all + off;
  const int* perm = perm_all + off;
  T* out = out_all + off;
  int* ids = ids_all + off;
  const double gap = kind == FB_RANK_L2 ? (double)n + 1.0
                                        : (kind == FB_RANK_KL ? log((double)n) + 1.0 : 2.0);
  int a = 0, nb = 0;
  while (a < n) {
    int e = a + 1;
    while (e < n && !((xs[e - 1] - xs[e]) / eps > gap)) ++e;
    for (int i = a; i < e; ++i) s[i] = relative(xs[i], xs[a], eps);
    // PAV on [a, e): slot j of the stack at a + j; counts in ids[a + j]
    int top = -1, start = a;  // start: first position of the top block
    for (int i = a; i < e; ++i) {
      ++top;
      if (kind == FB_RANK_KL) {
        st0[a + top] = s[i];
        st1[a + top] = 1.0;
      } else {
        st0[a + top] = s[i] - (kind == FB_RANK_L2 ? (double)(n - i) : (i < k ? 1.0 : 0.0));
      }
      ids[a + top] = 1;
      start = i;
      while (top > 0) {
        const int cb = ids[a + top - 1], ct = ids[a + top];
        const int bs = start - cb;  // start of the block below
        double vb, vt;
        if (kind == FB_RANK_KL) {
          vb = kl_rho_value(st0[a + top - 1], st1[a + top - 1], n, bs, start);
          vt = kl_rho_value(st0[a + top], st1[a + top], n, start, i + 1);
        } else {
          vb = st0[a + top - 1] / (double)cb;
          vt = st0[a + top] / (double)ct;
        }
        bool pool = vb < vt;
        if (vb == vt) pool = kind != FB_MASK || xs[bs] != xs[i];  // tie keys: the sorted x
        if (!pool) break;
        if (kind == FB_RANK_KL) {
          const double m1 = st0[a + top - 1], z1 = st1[a + top - 1];
          const double m2 = st0[a + top], z2 = st1[a + top];
          if (m1 >= m2) {
            st1[a + top - 1] = z1 + z2 * exp(m2 - m1);
          } else {
            st0[a + top - 1] = m2;
            st1[a + top - 1] = z2 + z1 * exp(m1 - m2);
          }
        } else {
          st0[a + top - 1] += st0[a + top];
        }
        ids[a + top - 1] = cb + ct;
        start = bs;
        --top;
      }
    }
    // block ids, right to left (slot j <= start of block j, so no count is overwritten unread)
    int stop = e;
    for (int j = top; j >= 0; --j) {
      const int c = ids[a + j];
      for (int i = stop - c; i < stop; ++i) ids[i] = nb + j;
      stop -= c;
    }
    // outputs per block
    int p = a;
    while (p < e) {
      int q = p + 1;
      while (q < e && ids[q] == ids[p]) ++q;
      const int cnt = q - p;
      if (kind == FB_RANK_KL) {
        const double sum_rho = (double)cnt * ((double)n - 0.5 * (double)(p + q - 1));
        if (cnt == 1) {
          put(out, perm, n, p, sum_rho);
        } else {
          double m = s[p];
          for (int i = p; i < q; ++i) m = s[i] > m ? s[i] : m;
          double z = 0.0;
          for (int i = p; i < q; ++i) z += exp(s[i] - m);
          const double factor = sum_rho / z;
          for (int i = p; i < q; ++i) {
            put(out, perm, n, i, clip(exp(s[i] - m) * factor, 1.0, (double)n));
          }
        }
      } else {
        const double mw = kind == FB_RANK_L2 ? (double)n - 0.5 * (double)(p + q - 1)
                                             : (double)sg::smax((q < k ? q : k) - p, 0) /
                                                   (double)cnt;
        const double lo = kind == FB_RANK_L2 ? 1.0 : 0.0;
        const double hi = kind == FB_RANK_L2 ? (double)n : 1.0;
        if (cnt == 1) {
          put(out, perm, n, p, clip(mw, lo, hi));
        } else {
          double total = 0.0;
          for (int i = p; i < q; ++i) total += s[i] - s[p];
          const double md = total / (double)cnt;
          for (int i = p; i < q; ++i) {
            put(out, perm, n, i, clip(((s[i] - s[p]) - md) + mw, lo, hi) + 0.0);
          }
        }
      }
      p = q;
    }
    nb += top + 1;
    a = e;
  }
}

}  // namespace sg_soft
