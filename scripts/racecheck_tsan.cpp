// The block programs (plane_program.h, column_program.h, strip_program.h) under
// ThreadSanitizer, in the GPU's own execution model: the CPU stand-in for
// compute-sanitizer's racecheck (scripts/racecheck_tsan.sh builds and runs it).
//
// Every GPU thread of a block is an OS thread that runs the whole program, as on the GPU
// (its loop state, `first`/`spare`, per_thread values in its own variables); Ctx::phase
// runs the lambda for this thread, then waits on the block's pthread barrier
// (__syncthreads). Each GPU thread has a copy-engine thread: copy16_async hands the copy
// to it (synchronised with the issue only) and it lands the 16 bytes whenever it runs;
// wait_async acquires its completions (cp.async.wait_all: this thread's copies only). So
// TSan reports, whatever the values:
// - two threads of one phase touching the same shared memory, one of them writing;
// - any access to a copy's destination, by another thread or by the issuer, not ordered
//   after the issuer's wait_async (and, for another thread, a barrier after it), however
//   many phases lie between the issue and the wait;
// - a block writing global memory another block reads or writes (the blocks of a grid
//   run at the same time).
// The emulator (emulate.cpp) sees these only as a change in the output between its
// forward and reverse runs. Besides, every 16-byte (8-byte for 16-bit I/O) vector access
// and copy must be aligned (the script adds that check to a copy of emu_check), a copy
// never waited for aborts, and each case's outputs must equal, bit for bit, a sequential
// run's (threads in order, copies landing at once) and be finite.
//
//   racecheck_tsan [GROUP] [quick]     GROUP: see main(); default all
#include <pthread.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "blurfast.h"
#include "column_program.h"
#include "emu_bf16.h"
#include "plane_program.h"
#include "strip_program.h"

using namespace blurfast;
using namespace blurfast::plane;

static void futex_wait(std::atomic<int>* a, int v) {
  syscall(SYS_futex, reinterpret_cast<int*>(a), FUTEX_WAIT_PRIVATE, v, nullptr, nullptr, 0);
}
static void futex_wake(std::atomic<int>* a) {
  syscall(SYS_futex, reinterpret_cast<int*>(a), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

struct Engine {                 // one GPU thread's asynchronous copies
  static constexpr int kRing = 4096;
  struct Copy {
    float* dst;
    const float* src;
  };
  Copy ring[kRing];
  std::atomic<int> issued{0}, done{0};     // issued < 0: stop
  std::thread th;
  void start() {
    th = std::thread([this] {
      int k = 0;
      for (;;) {
        int n = issued.load(std::memory_order_acquire);
        if (n < 0) return;
        if (n == k) {
          futex_wait(&issued, n);
          continue;
        }
        for (; k < n; ++k) {
          const Copy c = ring[k % kRing];
          float v[4];
          for (int q = 0; q < 4; ++q) v[q] = c.src[q];      // the source: a call input
          for (int q = 0; q < 4; ++q) c.dst[q] = v[q];      // plain stores: TSan sees them
          done.store(k + 1, std::memory_order_release);
          futex_wake(&done);
        }
      }
    });
  }
  void finish() {
    issued.store(-1, std::memory_order_release);
    syscall(SYS_futex, reinterpret_cast<int*>(&issued), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    th.join();
  }
};

// TSan makes pthread_barrier_wait a release into the barrier's one clock, then an
// acquire of it: with one barrier, a thread that leaves early could release its next
// phase's accesses into the clock before a slow thread acquires it, hiding races of that
// phase. Phases alternate between two barriers: a thread releases into a barrier again
// only after every thread has passed the other one, so after each acquire.
struct ThreadCtx {
  int tid = 0;
  int64_t blk = 0, grd = 1;
  pthread_barrier_t* bars = nullptr;       // two
  unsigned phases = 0;
  Engine* eng = nullptr;
  int64_t block() const { return blk; }
  int64_t grid() const { return grd; }
  template <typename F>
  void phase(F&& f) {
    f(tid);
    pthread_barrier_wait(&bars[phases++ & 1]);
  }
  template <typename T>
  struct PerThread {
    T v;
    T& operator()(int) { return v; }
  };
  template <typename T>
  PerThread<T> per_thread() const {
    return PerThread<T>{};
  }
  void copy16_async(float* dst, const float* src) {
    if (((uintptr_t)dst & 15) || ((uintptr_t)src & 15)) {
      fprintf(stderr, "MISALIGNED cp.async %p <- %p\n", (void*)dst, (const void*)src);
      abort();
    }
    emu_check(src, 16, false);
    emu_check(dst, 16, true);
    const int k = eng->issued.load(std::memory_order_relaxed);
    if (k - eng->done.load(std::memory_order_relaxed) >= Engine::kRing - 1) abort();
    eng->ring[k % Engine::kRing] = {dst, src};
    eng->issued.store(k + 1, std::memory_order_release);
    futex_wake(&eng->issued);
  }
  void wait_async() {
    const int n = eng->issued.load(std::memory_order_relaxed);
    for (;;) {
      const int d = eng->done.load(std::memory_order_acquire);
      if (d >= n) break;
      futex_wait(&eng->done, d);
    }
  }
  void check_done() {
    if (eng->done.load(std::memory_order_acquire) != eng->issued.load(std::memory_order_relaxed)) {
      fprintf(stderr, "cp.async never waited for (thread %d)\n", tid);
      abort();
    }
  }
};

struct SeqCtx {                 // the reference: threads one after another, copies at once
  int64_t blk = 0, grd = 1;
  int threads = 0;
  int64_t block() const { return blk; }
  int64_t grid() const { return grd; }
  template <typename F>
  void phase(F&& f) {
    for (int t = 0; t < threads; ++t) f(t);
  }
  template <typename T>
  struct PerThread {
    std::vector<T> v;
    T& operator()(int t) { return v[t]; }
  };
  template <typename T>
  PerThread<T> per_thread() const {
    return PerThread<T>{std::vector<T>(threads)};
  }
  void copy16_async(float* dst, const float* src) { std::memcpy(dst, src, 16); }
  void wait_async() {}
};

// Runs program(ctx, sm) on `grid` blocks of `threads` threads, concurrently (threaded) or
// in sequence (reference).
template <typename Prog>
void run_grid(int threads, int64_t grid, int64_t smem_floats, bool threaded,
              const std::vector<EmuRange>& memory, Prog&& program) {
  std::vector<std::vector<float>> sms(grid, std::vector<float>(smem_floats,
                                                              std::numeric_limits<float>::quiet_NaN()));
  if (!threaded) {
    for (int64_t b = 0; b < grid; ++b) {
      std::vector<EmuRange> mem = memory;
      mem.push_back({(const char*)sms[b].data(), (const char*)(sms[b].data() + smem_floats), true,
                     "shared"});
      emu_memory = &mem;
      SeqCtx ctx;
      ctx.blk = b;
      ctx.grd = grid;
      ctx.threads = threads;
      program(ctx, sms[b].data());
      emu_memory = nullptr;
    }
    return;
  }
  std::vector<pthread_barrier_t> bars(2 * grid);
  for (auto& b : bars) pthread_barrier_init(&b, nullptr, threads);
  std::vector<std::vector<EmuRange>> mems(grid, memory);
  for (int64_t b = 0; b < grid; ++b)
    mems[b].push_back({(const char*)sms[b].data(), (const char*)(sms[b].data() + smem_floats),
                       true, "shared"});
  std::vector<Engine> engines(grid * threads);
  for (auto& e : engines) e.start();
  std::vector<std::thread> ts;
  for (int64_t b = 0; b < grid; ++b)
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, b, t] {
        emu_memory = &mems[b];
        ThreadCtx ctx;
        ctx.tid = t;
        ctx.blk = b;
        ctx.grd = grid;
        ctx.bars = &bars[2 * b];
        ctx.eng = &engines[b * threads + t];
        program(ctx, sms[b].data());
        ctx.check_done();
        emu_memory = nullptr;
      });
  for (auto& t : ts) t.join();
  for (auto& e : engines) e.finish();
  for (auto& b : bars) pthread_barrier_destroy(&b);
}

static std::vector<float> randv(int64_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  std::mt19937 r(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(r);
  return v;
}

static bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

static int failures = 0;
static void expect_same(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  if (!same_bits(a, b)) {
    ++failures;
    fprintf(stderr, "MISMATCH threaded vs sequential: %s\n", what.c_str());
  }
  for (float x : a)
    if (!std::isfinite(x)) {
      ++failures;
      fprintf(stderr, "NON-FINITE output: %s\n", what.c_str());
      break;
    }
}

// ---------------------------------------------------------------- plane program
struct PlaneCase {
  int mode;
  bool x2, g, noise_out, zb, prefetch;
  int64_t planes, grid;
};

template <typename G, typename T>
void run_plane_case(const PlaneCase& c, const char* gname) {
  constexpr int N = G::N;
  const int64_t hw = (int64_t)N * N, n = c.planes * hw;
  auto to_io = [](const std::vector<float>& v) {
    std::vector<T> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (std::is_same<T, float>::value) o[i] = v[i];
      else o[i] = float_to_bf16_rn(v[i]);
    }
    return o;
  };
  auto from_io = [](const std::vector<T>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (std::is_same<T, float>::value) o[i] = v[i];
      else o[i] = bf16_to_float(v[i]);
    }
    return o;
  };
  const std::vector<T> x1 = to_io(randv(n, 1)), x2 = to_io(randv(n, 2));
  const int64_t mod1 = 2, mod2 = 1, modg = 3;
  const std::vector<float> a1 = randv(mod1 * hw, 3, 0.f, 1.f), a2 = randv(mod2 * hw, 4, 0.f, 1.f),
                           gm = randv(modg * hw, 5, 0.f, 1.f), zb = randv(n, 6);
  Job job;
  job.mode = c.mode;
  job.planes = c.planes;
  job.x1 = x1.data();
  job.prefetch = c.prefetch && std::is_same<T, float>::value;
  if (c.mode == kSpectral) {
    job.a1 = MapRef{a1.data(), 1, mod1};
    if (c.x2) {
      job.x2 = x2.data();
      job.a2 = MapRef{a2.data(), 2, mod2};
    }
    if (c.g) job.g = MapRef{gm.data(), 3, modg};
    if (c.zb) job.zb = zb.data();
    job.seed = 1234;
    job.offset = 8;
  }
  std::vector<float> outs[2], noises[2];
  for (int threaded = 0; threaded < 2; ++threaded) {
    std::vector<T> out(n), nout(n);
    job.out = out.data();
    job.noise_out = c.mode == kSpectral && c.noise_out ? nout.data() : nullptr;
    std::vector<EmuRange> m;
    auto add = [&](const char* name, const void* p, int64_t bytes, bool w) {
      if (p) m.push_back({(const char*)p, (const char*)p + bytes, w, name});
    };
    add("x1", job.x1, n * sizeof(T), false);
    add("x2", job.x2, n * sizeof(T), false);
    add("zb", job.zb, n * 4, false);
    add("a1", job.a1.ptr, mod1 * hw * 4, false);
    add("a2", job.a2.ptr, mod2 * hw * 4, false);
    add("g", job.g.ptr, modg * hw * 4, false);
    add("out", job.out, n * sizeof(T), true);
    add("noise_out", job.noise_out, n * sizeof(T), true);
    run_grid(G::kThreads, c.grid, G::smem_floats(buffers_of<G>(job)), threaded, m,
             [&](auto& ctx, float* sm) { run_program<G, T>(ctx, job, sm); });
    outs[threaded] = from_io(out);
    if (job.noise_out) noises[threaded] = from_io(nout);
  }
  char what[256];
  snprintf(what, sizeof what, "plane %s %s mode=%d x2=%d g=%d noise_out=%d zb=%d prefetch=%d planes=%ld grid=%ld",
           gname, std::is_same<T, float>::value ? "f32" : "bf16", c.mode, c.x2, c.g, c.noise_out,
           c.zb, c.prefetch, (long)c.planes, (long)c.grid);
  expect_same(outs[1], outs[0], what);
  if (!noises[0].empty()) expect_same(noises[1], noises[0], std::string(what) + " noise");
  fprintf(stderr, "done %s\n", what);
}

template <typename G, typename T>
void plane_all(const char* gname, bool quick) {
  const int64_t grid = 2;
  // five plane groups: block 0 takes three (its prefetch buffers trade places twice),
  // the last one partial where a group has several planes
  const int64_t planes = G::kPPB * (grid * 3 - 1) - (G::kPPB > 1 ? 1 : 0);
  for (int prefetch = 0; prefetch < 2; ++prefetch) {
    if (prefetch && !std::is_same<T, float>::value) continue;
    run_plane_case<G, T>({kDct2, 0, 0, 0, 0, (bool)prefetch, planes, grid}, gname);
    run_plane_case<G, T>({kIdct2, 0, 0, 0, 0, (bool)prefetch, planes, grid}, gname);
    for (int x2 = 0; x2 < 2; ++x2)
      for (int g = 0; g < 2; ++g)
        for (int no = 0; no < 2; ++no) {
          if (quick && !(g && (x2 != no))) continue;    // sampler step and q_sample only
          run_plane_case<G, T>({kSpectral, (bool)x2, (bool)g, (bool)no, false, (bool)prefetch,
                                planes, grid}, gname);
          if (g && x2 != no)    // the sampler step and q_sample with zb given
            run_plane_case<G, T>({kSpectral, (bool)x2, (bool)g, (bool)no, true, (bool)prefetch,
                                  planes, grid}, gname);
        }
  }
}

// ---------------------------------------------------------------- column program
template <int L>
void column_case(bool x2, bool g, bool no, int W, int64_t planes, int64_t grid) {
  const int64_t hw = (int64_t)L * W, n = planes * hw;
  const std::vector<float> t1 = randv(n, 11), t2 = randv(n, 12), a1 = randv(hw, 13),
                           a2 = randv(hw, 14), gm = randv(2 * hw, 15);
  ColumnJob job;
  job.spec.mode = kSpectral;
  job.spec.planes = planes;
  job.spec.a1 = MapRef{a1.data(), 1, 1};
  if (x2) {
    job.spec.x2 = t2.data();
    job.spec.a2 = MapRef{a2.data(), 1, 1};
    job.t2 = t2.data();
  }
  if (g) job.spec.g = MapRef{gm.data(), 1, 2};
  job.spec.seed = 99;
  job.t1 = t1.data();
  job.plane0 = 0;
  job.planes = planes;
  job.W = W;
  std::vector<float> r1[2], r2[2];
  for (int threaded = 0; threaded < 2; ++threaded) {
    std::vector<float> u1(n), u2(n);
    job.u1 = u1.data();
    job.u2 = no ? u2.data() : nullptr;
    job.spec.noise_out = no ? u2.data() : nullptr;
    std::vector<EmuRange> m;
    m.push_back({(const char*)t1.data(), (const char*)(t1.data() + n), false, "t1"});
    if (x2) m.push_back({(const char*)t2.data(), (const char*)(t2.data() + n), false, "t2"});
    m.push_back({(const char*)a1.data(), (const char*)(a1.data() + hw), false, "a1"});
    if (x2) m.push_back({(const char*)a2.data(), (const char*)(a2.data() + hw), false, "a2"});
    if (g) m.push_back({(const char*)gm.data(), (const char*)(gm.data() + 2 * hw), false, "g"});
    m.push_back({(const char*)u1.data(), (const char*)(u1.data() + n), true, "u1"});
    if (no) m.push_back({(const char*)u2.data(), (const char*)(u2.data() + n), true, "u2"});
    run_grid(ColumnGeom<L>::kThreads, grid, ColumnGeom<L>::kSmemFloats, threaded, m,
             [&](auto& ctx, float* sm) { run_column_spectral<L>(ctx, job, sm); });
    r1[threaded] = u1;
    r2[threaded] = u2;
  }
  char what[160];
  snprintf(what, sizeof what, "column L=%d W=%d x2=%d g=%d noise_out=%d", L, W, x2, g, no);
  expect_same(r1[1], r1[0], what);
  if (no) expect_same(r2[1], r2[0], std::string(what) + " noise");
  fprintf(stderr, "done %s\n", what);
}

// ---------------------------------------------------------------- strip programs
template <int L, bool Fast, bool Same>
void strip_case(bool inverse, int64_t planes, int64_t rows, int64_t grid, bool two) {
  const int64_t n = planes * rows * L;
  const std::vector<float> in = randv(n, 21), in2 = randv(n, 22);
  StripJob job;
  job.in = in.data();
  job.planes = planes;
  job.rows = rows;
  job.inverse = inverse;
  std::vector<float> r[2], r2[2];
  for (int threaded = 0; threaded < 2; ++threaded) {
    std::vector<float> out(n), out2(n);
    job.out = out.data();
    std::vector<EmuRange> m;
    int64_t split = 0;
    if (two && Same) {       // out2 from split_rows on
      split = (planes / 2) * rows;
      job.out2 = out2.data();
      job.split_rows = split;
      m.push_back({(const char*)out.data(), (const char*)(out.data() + split * L), true, "out"});
      m.push_back({(const char*)out2.data(), (const char*)(out2.data() + n - split * L), true, "out2"});
      m.push_back({(const char*)in.data(), (const char*)(in.data() + n), false, "in"});
    } else if (two && Fast && !inverse) {
      split = (planes / 2) * rows;
      job.in2 = in2.data();
      job.split_rows = split;
      m.push_back({(const char*)in.data(), (const char*)(in.data() + split * L), false, "in"});
      m.push_back({(const char*)in2.data(), (const char*)(in2.data() + n - split * L), false, "in2"});
      m.push_back({(const char*)out.data(), (const char*)(out.data() + n), true, "out"});
    } else {
      m.push_back({(const char*)in.data(), (const char*)(in.data() + n), false, "in"});
      m.push_back({(const char*)out.data(), (const char*)(out.data() + n), true, "out"});
    }
    if constexpr (Fast) {
      using G = FastStripGeom<L>;
      run_grid(G::kThreads, grid, G::kSmemFloats, threaded, m, [&](auto& ctx, float* sm) {
        run_fast_strips<L, float, float, std::remove_reference_t<decltype(ctx)>, Same>(ctx, job, sm);
      });
    } else {
      using G = StripGeom<L>;
      run_grid(G::kThreads, grid, G::kSmemFloats, threaded, m, [&](auto& ctx, float* sm) {
        run_strips<L, float, float>(ctx, job, sm);
      });
    }
    r[threaded] = out;
    r2[threaded] = out2;
  }
  char what[160];
  snprintf(what, sizeof what, "strip L=%d fast=%d same=%d inverse=%d two=%d rows=%ld", L, Fast, Same,
           inverse, two, (long)rows);
  expect_same(r[1], r[0], what);
  if (two && Same) expect_same(r2[1], r2[0], std::string(what) + " out2");
  fprintf(stderr, "done %s\n", what);
}

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "all";
  const bool quick = argc > 2 && std::string(argv[2]) == "quick";
  auto want = [&](const char* s) { return which == "all" || which == s; };
  if (want("wide")) plane_all<Geom<64, 4, true>, float>("64-split4-fast", false);
  if (want("fast64s2")) plane_all<Geom<64, 2, true>, float>("64-split2-fast", false);
  if (want("fast64")) plane_all<Geom<64, 1, true>, float>("64-split1-fast", false);
  if (want("fast32")) plane_all<Geom<32, 1, true>, float>("32-split1-fast", false);
  if (want("fast128")) plane_all<Geom<128, 1, true>, float>("128-split1-fast", quick);
  if (want("dense32")) plane_all<Geom<32>, float>("32-split1-dense", quick);
  if (want("dense64")) plane_all<Geom<64>, float>("64-split1-dense", quick);
  if (want("dense64s2")) plane_all<Geom<64, 2>, float>("64-split2-dense", quick);
  if (want("dense128")) plane_all<Geom<128>, float>("128-split1-dense", quick);
  if (want("dense128s2")) plane_all<Geom<128, 2>, float>("128-split2-dense", quick);
  if (want("bf16")) {
    plane_all<Geom<64, 4, true>, EmuBf16>("64-split4-fast", true);
    plane_all<Geom<64, 1, true>, EmuBf16>("64-split1-fast", true);
    plane_all<Geom<64, 2, true>, EmuBf16>("64-split2-fast", true);
    plane_all<Geom<32, 1, true>, EmuBf16>("32-split1-fast", true);
  }
  if (want("column")) {
    for (int x2 = 0; x2 < 2; ++x2)
      for (int no = 0; no < 2; ++no) {
        column_case<32>(x2, true, no, 64, 2, 2);
        column_case<64>(x2, true, no, 64, 2, 2);
        column_case<128>(x2, true, no, 64, 1, 2);
        column_case<256>(x2, x2, no, 64, 1, 2);
      }
  }
  if (want("strip")) {
    for (int inv = 0; inv < 2; ++inv) {
      strip_case<32, true, false>(inv, 5, 64, 2, false);
      strip_case<64, true, false>(inv, 3, 96, 2, false);
      strip_case<128, true, false>(inv, 3, 96, 2, false);
      strip_case<256, true, false>(inv, 2, 96, 2, false);
      strip_case<32, false, false>(inv, 3, 64, 2, false);
      strip_case<64, false, false>(inv, 3, 64, 2, false);
      strip_case<128, false, false>(inv, 2, 64, 2, false);
      strip_case<256, false, false>(inv, 2, 32, 2, false);
    }
    strip_case<256, true, false>(false, 4, 64, 2, true);     // in2
    strip_case<32, true, true>(true, 4, 64, 2, true);        // same layout, out2
    strip_case<64, true, true>(true, 4, 64, 2, false);
    strip_case<128, true, true>(true, 4, 64, 2, true);
    strip_case<256, true, true>(true, 4, 64, 2, true);
  }
  fprintf(stderr, "FAILURES %d\n", failures);
  return failures ? 1 : 0;
}
