// Exact float32 <-> float64 conversions that survive CuPy's -ftz=true.
//
// CuPy compiles every RawModule with -ftz=true, under which NVRTC emits the flushing forms of
// float32 instructions: `(double)f` becomes cvt.ftz.f64.f32 and `(float)d` cvt.rn.ftz.f32.f64,
// so subnormal float32 values (and results) turn into zeros. The CPU backend keeps them. These
// helpers convert through the bits with integer and float64 operations only (float64 is never
// flushed), so a kernel that widens every float32 load with widen(), does its arithmetic in
// float64 and narrows every float32 result with Narrow<float>::of() gives the CPU's values
// for every input (tests/kernels/test_cuda_compile.py checks the PTX for flushing
// instructions). Both are the identity on double.
//
//   widen(float):        exact; +-0, subnormals, +-inf kept; NaN keeps its sign and payload
//                        and becomes quiet (as x86's cvtss2sd).
//   Narrow<float>::of(): round to nearest, ties to even (the CPU's float64 -> float32 cast):
//                        subnormal results kept, overflow to +-inf, NaN keeps its sign and the
//                        top of its payload and becomes quiet (as x86's cvtsd2ss).
#pragma once

#include "sortgrad_common.cuh"

#if defined(SG_HOST_EMULATION)
#include <cstring>
#endif

namespace sg {

// The bits of v as a To of the same width (no conversion).
template <class To, class From>
__device__ __forceinline__ To bits_as(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "same width");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ double widen(float v) {
  const u32 b = bits_as<u32>(v);
  const u64 sign = (u64)(b & 0x80000000u) << 32;
  const u32 e = (b >> 23) & 0xffu;
  const u64 m = b & 0x007fffffu;
  if (e == 0u) {
    // zero or subnormal m * 2^-149: int -> double and a power-of-two scale are exact
    const double a = (double)(int)m * 0x1p-149;
    return bits_as<double>(bits_as<u64>(a) | sign);
  }
  u64 out;
  if (e == 0xffu) {  // inf, NaN (quieted)
    out = 0x7ff0000000000000ull | (m << 29) | (m ? 0x0008000000000000ull : 0ull);
  } else {  // normal: rebias the exponent (1023 - 127 = 896), widen the mantissa
    out = ((u64)(e + 896u) << 52) | (m << 29);
  }
  return bits_as<double>(out | sign);
}

template <class T> struct Narrow;
template <> struct Narrow<double> {
  static __device__ __forceinline__ double of(double v) { return v; }
};
template <> struct Narrow<float> {
  static __device__ __forceinline__ float of(double v) {
    const u64 b = bits_as<u64>(v);
    const u32 sign = (u32)(b >> 32) & 0x80000000u;
    const u32 e = (u32)(b >> 52) & 0x7ffu;
    const u64 m = b & 0x000fffffffffffffull;
    u32 out;
    if (e == 0x7ffu) {  // inf, NaN (quieted, the payload's top 22 bits kept)
      out = 0x7f800000u | (m ? 0x00400000u | (u32)(m >> 29) : 0u);
    } else if (e >= 1023u + 128u) {  // |v| >= 2^128
      out = 0x7f800000u;
    } else if (e >= 1023u - 126u) {
      // normal float32 range before rounding: drop 29 mantissa bits, round half to even; a
      // carry runs into the exponent (up to +inf), as it should
      out = ((e - 896u) << 23) | (u32)(m >> 29);
      const u64 rest = m & 0x1fffffffull, half = 0x10000000ull;
      if (rest > half || (rest == half && (out & 1u))) ++out;
    } else {
      // below 2^-126: the result is a multiple of 2^-149, |v| / 2^-149 = sig / 2^shift with
      // sig the 53-bit significand
      const u32 shift = 926u - e;  // >= 30
      if (shift > 54u) {  // |v| < 2^-150 (double subnormals and zeros too): rounds to 0
        out = 0u;
      } else {
        const u64 sig = m | 0x0010000000000000ull;
        const u64 rest = sig & ((1ull << shift) - 1ull), half = 1ull << (shift - 1u);
        out = (u32)(sig >> shift);  // a carry to 2^23 is the smallest normal's bits
        if (rest > half || (rest == half && (out & 1u))) ++out;
      }
    }
    return bits_as<float>(out | sign);
  }
};

}  // namespace sg
