// Host emulation of the CUDA subset sortgrad's kernels use, for tests on machines without a GPU
// (tests/_emulation/cuda_host.py compiles each .cu file with g++ after this header; test
// machinery, not shipped in the wheel).
//
// Every CUDA thread of a block is a fiber (own stack, cooperative switches); blocks run one after
// another. Supported: threadIdx/blockIdx/blockDim/gridDim, static __shared__ arrays (function
// statics: shared by the block's fibers), __syncthreads, __syncwarp, full-mask __shfl*_sync and
// __ballot_sync, __popc/__ffs, shared-memory atomicAdd. Checks: a barrier that some threads of
// the block (or warp) never reach -- divergent __syncthreads, a thread exiting before a barrier
// the others wait at, a warp collective without all 32 lanes -- aborts the launch with an error.
// Fibers switch only at barriers, in alternating forward and reverse thread order, so a
// missing __syncthreads between a shared-memory write and another thread's read shows up as a
// wrong result. Shared memory is not zeroed between blocks (as on a GPU, content is undefined).
// Not emulated: memory fences, global atomics across blocks, timing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define SG_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace sg_emu {

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
  void* sp = nullptr;
  dim3 tid;
  int linear = 0;
  State state = RUNNABLE;
  char* stack = nullptr;
};

constexpr size_t STACK_BYTES = 256 * 1024;

inline std::vector<Fiber>& fibers() {
  static std::vector<Fiber> f;
  return f;
}
inline Fiber*& current() {
  static Fiber* c = nullptr;
  return c;
}
inline void*& scheduler_sp() {
  static void* sp = nullptr;
  return sp;
}
inline dim3& block_idx() {
  static dim3 d;
  return d;
}
inline dim3& block_dim() {
  static dim3 d;
  return d;
}
inline dim3& grid_dim() {
  static dim3 d;
  return d;
}
inline void (*&body())(void*) {
  static void (*b)(void*) = nullptr;
  return b;
}
inline void*& body_arg() {
  static void* a = nullptr;
  return a;
}
// per-warp exchange slots for shuffles and ballots (16 bytes per lane)
inline std::vector<unsigned char>& exchange() {
  static std::vector<unsigned char> e;
  return e;
}
inline std::string& error() {
  static std::string e;
  return e;
}

}  // namespace sg_emu

// --- context switch ------------------------------------------------------------------------
#if defined(__x86_64__)
extern "C" void sg_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl sg_emu_switch
.type sg_emu_switch,@function
sg_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size sg_emu_switch, .-sg_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#elif defined(__aarch64__)
extern "C" void sg_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl sg_emu_switch
.type sg_emu_switch,%function
sg_emu_switch:
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #176
    ret
.size sg_emu_switch, .-sg_emu_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#else
#error "sortgrad_emulation.cuh supports x86-64 and aarch64 hosts"
#endif

namespace sg_emu {

[[noreturn]] inline void fiber_main() {
  Fiber* f = current();
  body()(body_arg());
  f->state = DONE;
  sg_emu_switch(&f->sp, scheduler_sp());
  std::abort();  // a finished fiber is never resumed
}

inline void init_fiber(Fiber& f) {
  if (!f.stack) f.stack = static_cast<char*>(std::malloc(STACK_BYTES));
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + STACK_BYTES) & ~uintptr_t(15);
  void** sp;
#if defined(__x86_64__)
  // [top-8]: fake return address of fiber_main (it never returns); [top-16]: fiber_main, popped
  // by `ret`, leaving rsp = top - 8 (the alignment of a function entry); below: 6 registers.
  sp = reinterpret_cast<void**>(top - 16);
  sp[1] = nullptr;
  sp[0] = reinterpret_cast<void*>(&fiber_main);
  sp -= 6;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
#else
  // 176-byte frame: x19..x28, x29 (fp), x30 (lr = fiber_main), d8..d15
  sp = reinterpret_cast<void**>(top - 176);
  std::memset(sp, 0, 176);
  sp[11] = reinterpret_cast<void*>(&fiber_main);
#endif
  f.sp = sp;
  f.state = RUNNABLE;
}

inline void wait_at(State s) {
  Fiber* f = current();
  f->state = s;
  sg_emu_switch(&f->sp, scheduler_sp());
}

inline int lane() { return current()->linear & 31; }
inline int warp() { return current()->linear >> 5; }

inline void fail(const std::string& what) {
  if (error().empty()) error() = what;
}

// Runs one block to completion; returns false on a barrier error.
inline bool run_block(int nthreads) {
  auto& fs = fibers();
  const unsigned bx = block_dim().x, by = block_dim().y;
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = fs[i];
    f.linear = i;
    f.tid = dim3(i % bx, (i / bx) % by, i / (bx * by));
    init_fiber(f);
  }
  bool forward = true;
  for (;;) {
    bool ran = false;
    for (int n = 0; n < nthreads; ++n) {
      Fiber& f = fs[forward ? n : nthreads - 1 - n];
      if (f.state != RUNNABLE) continue;
      current() = &f;
      sg_emu_switch(&scheduler_sp(), f.sp);
      ran = true;
    }
    forward = !forward;
    int done = 0, at_block = 0, at_warp = 0;
    for (int i = 0; i < nthreads; ++i) {
      done += fs[i].state == DONE;
      at_block += fs[i].state == AT_BLOCK_BARRIER;
      at_warp += fs[i].state == AT_WARP_BARRIER;
    }
    if (done == nthreads) return true;
    bool released = false;
    // warp barriers: released when all 32 lanes wait at one
    for (int w = 0; w * 32 < nthreads; ++w) {
      int waiting = 0, finished = 0;
      for (int l = 0; l < 32 && w * 32 + l < nthreads; ++l) {
        waiting += fs[w * 32 + l].state == AT_WARP_BARRIER;
        finished += fs[w * 32 + l].state == DONE;
      }
      if (waiting == 32) {
        for (int l = 0; l < 32; ++l) fs[w * 32 + l].state = RUNNABLE;
        released = true;
      } else if (waiting > 0 && waiting + finished == 32) {
        fail("warp collective after some lanes of the warp exited");
        return false;
      }
    }
    if (!released && at_block > 0) {
      if (at_block == nthreads) {
        for (int i = 0; i < nthreads; ++i) fs[i].state = RUNNABLE;
        released = true;
      } else if (at_block + done == nthreads) {
        fail("__syncthreads after some threads of the block exited");
        return false;
      }
    }
    if (!released && !ran) {
      fail("deadlock: threads wait at different barriers (divergent __syncthreads or a warp "
           "collective inside a block barrier)");
      return false;
    }
  }
}

inline unsigned char* slot(int lane_index) {
  return exchange().data() + (size_t(warp()) * 32 + lane_index) * 16;
}

template <class T>
T shuffle(T v, int src) {
  static_assert(sizeof(T) <= 16, "shuffle of a type wider than 16 bytes");
  std::memcpy(slot(lane()), &v, sizeof(T));
  wait_at(AT_WARP_BARRIER);
  T out = v;
  if (src >= 0 && src < 32) std::memcpy(&out, slot(src), sizeof(T));
  wait_at(AT_WARP_BARRIER);
  return out;
}

inline void check_mask(unsigned mask) {
  if (mask != 0xffffffffu) {
    fail("warp collective with a partial mask (not emulated)");
    std::abort();
  }
}

// Launch: kernel arguments arrive as an array of pointers to their values (as for
// cuLaunchKernel).
template <class... Args, size_t... I>
void call_with(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<typename std::remove_reference<Args>::type*>(args[I])...);
}

template <class... Args>
struct Launch {
  void (*kernel)(Args...);
  void** args;
  static void run(void* self) {
    auto* l = static_cast<Launch*>(self);
    call_with(l->kernel, l->args, std::index_sequence_for<Args...>{});
  }
};

// Returns 0 on success, 1 on an emulation error (see last_error()).
template <class... Args>
int launch(void (*kernel)(Args...), dim3 grid, dim3 block, void** args) {
  error().clear();
  const int nthreads = int(block.x * block.y * block.z);
  if (nthreads <= 0 || nthreads > 1024) {
    fail("bad block size");
    return 1;
  }
  if (int(fibers().size()) < nthreads) fibers().resize(nthreads);
  exchange().assign(size_t((nthreads + 31) / 32) * 32 * 16, 0);
  Launch<Args...> l{kernel, args};
  body() = &Launch<Args...>::run;
  body_arg() = &l;
  block_dim() = block;
  grid_dim() = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        block_idx() = dim3(x, y, z);
        if (!run_block(nthreads)) return 1;
      }
  return error().empty() ? 0 : 1;
}

// Sizes of a kernel's parameters, and whether each is a pointer (for argument checks).
template <class... Args>
int describe(void (*)(Args...), long long* sizes, int* pointers, int capacity) {
  const long long s[] = {(long long)sizeof(Args)..., 0};
  const int p[] = {(int)std::is_pointer<Args>::value..., 0};
  const int count = int(sizeof...(Args));
  for (int i = 0; i < count && i < capacity; ++i) {
    sizes[i] = s[i];
    pointers[i] = p[i];
  }
  return count;
}

}  // namespace sg_emu

#define threadIdx (::sg_emu::current()->tid)
#define blockIdx (::sg_emu::block_idx())
#define blockDim (::sg_emu::block_dim())
#define gridDim (::sg_emu::grid_dim())

inline void __syncthreads() { ::sg_emu::wait_at(::sg_emu::AT_BLOCK_BARRIER); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::sg_emu::check_mask(mask);
  ::sg_emu::wait_at(::sg_emu::AT_WARP_BARRIER);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  ::sg_emu::check_mask(mask);
  (void)width;
  return ::sg_emu::shuffle(v, src & 31);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  ::sg_emu::check_mask(mask);
  (void)width;
  return ::sg_emu::shuffle(v, ::sg_emu::lane() ^ lane_mask);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::sg_emu::check_mask(mask);
  (void)width;
  const int src = ::sg_emu::lane() - int(delta);
  return ::sg_emu::shuffle(v, src < 0 ? ::sg_emu::lane() : src);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  ::sg_emu::check_mask(mask);
  (void)width;
  const int src = ::sg_emu::lane() + int(delta);
  return ::sg_emu::shuffle(v, src > 31 ? ::sg_emu::lane() : src);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  ::sg_emu::check_mask(mask);
  unsigned char* mine = ::sg_emu::slot(::sg_emu::lane());
  mine[0] = predicate != 0;
  ::sg_emu::wait_at(::sg_emu::AT_WARP_BARRIER);
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) out |= unsigned(::sg_emu::slot(l)[0]) << l;
  ::sg_emu::wait_at(::sg_emu::AT_WARP_BARRIER);
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == 0xffffffffu;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
template <class T>
T atomicAdd(T* address, T value) {  // fibers never interleave inside a function call
  const T old = *address;
  *address = old + value;
  return old;
}
template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
T max(T a, T b) {
  return a < b ? b : a;
}
