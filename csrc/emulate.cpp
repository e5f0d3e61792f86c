// CPU emulation of the CUDA programs (plane_program.h, strip_program.h, combine.h), for
// tests, with float or bfloat16 I/O (EmuBf16, emu_bf16.h).
//
// Runs the same phase code the kernel runs, one thread after another, block after block.
// Shared memory starts as NaN, so a read of a value no thread wrote shows up in the
// output; running the threads of each phase in reverse order changes the result of any
// phase in which one thread reads what another writes (a missing barrier), and running
// the blocks in reverse order too shows a block that writes output another block owns
// (hidden in forward runs whenever the owner runs later); vector and I/O accesses
// outside the call's buffers, and writes that land in two overlapping buffers, throw
// (line_passes.h, emu_check).
//
// An asynchronous copy (copy16_async) lands at once in forward runs, and only at its own
// thread's next wait_async in reverse runs: a read before the wait, or a write to the
// copy's destination between the two, gives another result in one of the runs. A copy
// still pending when a block ends throws.
#include <algorithm>
#include <array>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "blurfast.h"
#include "column_program.h"
#include "combine.h"
#include "emu_bf16.h"
#include "plane_program.h"
#include "strip_program.h"

namespace blurfast {
namespace {

struct EmuCtx {
  int64_t blk = 0, grd = 1;
  int threads = 0;
  bool reverse = false;
  int cur = 0;                     // the thread phase() is running (its copies' owner)
  struct Copy {
    float* dst;
    float v[4];
  };
  std::vector<std::vector<Copy>> pending;      // per thread; sized in reverse runs only
  int64_t block() const { return blk; }
  int64_t grid() const { return grd; }
  template <typename F>
  void phase(F&& f) {
    if (reverse)
      for (int t = threads - 1; t >= 0; --t) f(cur = t);
    else
      for (int t = 0; t < threads; ++t) f(cur = t);
  }
  // State a thread keeps in registers from one phase to a later one: one copy per thread.
  template <typename T>
  struct PerThread {
    std::vector<T> v;
    T& operator()(int t) { return v[t]; }
  };
  template <typename T>
  PerThread<T> per_thread() const {
    return PerThread<T>{std::vector<T>(threads)};
  }
  // The source is read when the copy is issued: it is the call's input, which no thread
  // writes.
  void copy16_async(float* dst, const float* src) {
    Copy c{dst, {}};
    plane::ld4(src, c.v);
    if (!reverse) {
      plane::st4(dst, c.v);
      return;
    }
    pending.at(cur).push_back(c);
  }
  void wait_async() {
    if (pending.empty()) return;
    for (const Copy& c : pending[cur]) plane::st4(c.dst, c.v);
    pending[cur].clear();
  }
  // Called when the block's program returns.
  void check_no_copy_pending() const {
    for (const auto& p : pending)
      if (!p.empty()) throw std::logic_error("emulator: an asynchronous copy was never waited for");
  }
};

// Runs block_program(ctx, smem) for blocks 0 .. grid-1, shared memory poisoned first.
// `memory`: the call's buffers; shared memory is added, and every checked access of the
// program must fall inside one of them (line_passes.h, emu_check).
template <typename F>
void run_blocks(int64_t smem_floats, int threads, int64_t grid, bool reverse,
                std::vector<plane::EmuRange> memory, F&& block_program) {
  std::vector<float> sm(smem_floats);
  memory.push_back(
      {(const char*)sm.data(), (const char*)(sm.data() + sm.size()), true, "shared memory"});
  struct Scope {                   // sets the checked list for this thread, always resets it
    explicit Scope(const std::vector<plane::EmuRange>* m) { plane::emu_memory = m; }
    ~Scope() { plane::emu_memory = nullptr; }
  } scope(&memory);
  for (int64_t i = 0; i < grid; ++i) {
    std::fill(sm.begin(), sm.end(), std::numeric_limits<float>::quiet_NaN());
    EmuCtx ctx;
    ctx.blk = reverse ? grid - 1 - i : i;
    ctx.grd = grid;
    ctx.threads = threads;
    ctx.reverse = reverse;
    if (reverse) ctx.pending.resize(threads);
    block_program(ctx, sm.data());
    ctx.check_no_copy_pending();
  }
}

// The buffer [p, p + n elements of E), argument `name` of the call, as a range (none for a
// null pointer).
template <typename E = float>
void add_range(std::vector<plane::EmuRange>& m, const char* name, const void* p, int64_t n,
               bool writable) {
  if (p) m.push_back({(const char*)p, (const char*)p + n * (int64_t)sizeof(E), writable, name});
}

// T: the I/O type of x1, x2, out and noise_out; maps and zb are float.
template <typename T>
std::vector<plane::EmuRange> job_memory(const plane::Job& job, int64_t hw) {
  std::vector<plane::EmuRange> m;
  const int64_t n = job.planes * hw;
  add_range<T>(m, "x1", job.x1, n, false);
  add_range<T>(m, "x2", job.x2, n, false);
  add_range(m, "zb", job.zb, n, false);
  add_range(m, "a1", job.a1.ptr, job.a1.mod * hw, false);
  add_range(m, "a2", job.a2.ptr, job.a2.mod * hw, false);
  add_range(m, "g", job.g.ptr, job.g.mod * hw, false);
  add_range<T>(m, "out", job.out, n, true);
  add_range<T>(m, "noise_out", job.noise_out, n, true);
  return m;
}

// Calls f((T*)nullptr) for the emulated I/O type T of dtype: float or EmuBf16.
template <typename F>
void with_emu_io(int dtype, const char* who, F&& f) {
  if (dtype == kF32)
    f((float*)nullptr);
  else if (dtype == kBF16)
    f((plane::EmuBf16*)nullptr);
  else
    throw std::invalid_argument(std::string(who) + ": dtype must be float32 or bfloat16");
}

template <typename G, typename T>
void emulate(const plane::Job& job, int64_t grid, bool reverse) {
  run_blocks(G::smem_floats(plane::buffers_of<G>(job)), G::kThreads, grid, reverse,
             job_memory<T>(job, (int64_t)G::N * G::N),
             [&](EmuCtx& ctx, float* sm) { plane::run_program<G, T>(ctx, job, sm); });
}

template <int L, typename Tin, typename Tout>
void emulate_strips(const plane::StripJob& job, int64_t grid, bool reverse, bool fast,
                    bool same_layout) {
  std::vector<plane::EmuRange> memory;
  if (job.in2) {                   // rows past split_rows come from in2
    if (!fast || job.split_rows % plane::FastStripGeom<L>::kRows != 0)
      throw std::invalid_argument(
          "strip_emulate: in2 needs the fast passes and split_rows a multiple of a block's rows");
    add_range<Tin>(memory, "in", job.in, job.split_rows * L, false);
    add_range<Tin>(memory, "in2", job.in2, (job.planes * job.rows - job.split_rows) * L, false);
  } else {
    add_range<Tin>(memory, "in", job.in, job.planes * job.rows * L, false);
  }
  if (job.out2) {                  // rows past split_rows go to out2
    add_range<Tout>(memory, "out", job.out, job.split_rows * L, true);
    add_range<Tout>(memory, "out2", job.out2, (job.planes * job.rows - job.split_rows) * L,
                    true);
  } else {
    add_range<Tout>(memory, "out", job.out, job.planes * job.rows * L, true);
  }
  if (same_layout && !(fast && job.inverse && std::is_same<Tin, float>::value))
    throw std::invalid_argument(
        "strip_emulate: same_layout is for the fast inverse pass with float input only");
  if (fast) {
    using G = plane::FastStripGeom<L>;
    run_blocks(G::kSmemFloats, G::kThreads, grid, reverse, memory, [&](EmuCtx& ctx, float* sm) {
      if (same_layout)
        plane::run_fast_strips<L, Tin, Tout, EmuCtx, true>(ctx, job, sm);
      else
        plane::run_fast_strips<L, Tin, Tout>(ctx, job, sm);
    });
    return;
  }
  using G = plane::StripGeom<L>;
  run_blocks(G::kSmemFloats, G::kThreads, grid, reverse, memory,
             [&](EmuCtx& ctx, float* sm) { plane::run_strips<L, Tin, Tout>(ctx, job, sm); });
}

// f(std::integral_constant<int, L>{}) for a line length L already checked to be 32, 64, 128
// or 256.
template <typename F>
void with_line_length(int64_t L, F&& f) {
  switch (L) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 256>{}); break;
  }
}

// `call_planes`: the whole call's, for the range of zb (indexed by the call's plane).
template <int L>
void emulate_columns(const plane::ColumnJob& job, int64_t call_planes, int64_t grid,
                     bool reverse) {
  using G = plane::ColumnGeom<L>;
  const plane::Job& s = job.spec;
  const int64_t n = job.planes * L * job.W, hw = (int64_t)L * job.W;
  std::vector<plane::EmuRange> m;
  add_range(m, "t1", job.t1, n, false);
  add_range(m, "t2", job.t2, n, false);
  add_range(m, "zb", s.zb, call_planes * hw, false);
  add_range(m, "a1", s.a1.ptr, s.a1.mod * hw, false);
  add_range(m, "a2", s.a2.ptr, s.a2.mod * hw, false);
  add_range(m, "g", s.g.ptr, s.g.mod * hw, false);
  add_range(m, "u1", job.u1, n, true);
  add_range(m, "u2", job.u2, n, true);
  run_blocks(G::kSmemFloats, G::kThreads, grid, reverse, m, [&](EmuCtx& ctx, float* sm) {
    plane::run_column_spectral<L>(ctx, job, sm);
  });
}

template <typename C>
void emulate_combine(const SpectralParams& p) {
  const CombineJob<C> job = combine_job<C>(p, (C*)const_cast<void*>(p.x1), (const C*)p.x2,
                                           (C*)p.noise_out);
  const int64_t hw = job.hw, n = job.planes * hw, w = sizeof(C) / sizeof(float);
  std::vector<plane::EmuRange> m;
  add_range(m, "f1", job.f1, n * w, true);
  add_range(m, "f2", job.f2, n * w, false);
  add_range(m, "zb", job.zb, n * w, false);
  add_range(m, "a1", job.a1.ptr, job.a1.mod * hw * w, false);
  add_range(m, "a2", job.a2.ptr, job.a2.mod * hw * w, false);
  add_range(m, "g", job.g.ptr, job.g.mod * hw * w, false);
  add_range(m, "zb_out", job.zb_out, n * w, true);
  plane::emu_memory = &m;
  try {
    for (int64_t q = 0; q < job.planes; ++q) {
      const PlaneMaps<C> maps(job, q);
      for (int64_t k = 0; k < combine_quads(job); ++k) combine_quad(job, maps, q, k);
    }
  } catch (...) {
    plane::emu_memory = nullptr;
    throw;
  }
  plane::emu_memory = nullptr;
}

}  // namespace

void combine_emulate(const SpectralParams& p) {
  if (p.dtype == kF32)
    emulate_combine<float>(p);
  else if (p.dtype == kF64)
    emulate_combine<double>(p);
  else
    throw std::invalid_argument("combine_emulate: float32 or float64 only");
}

void column_emulate(const SpectralParams& p, int64_t grid, bool reverse_threads, int64_t chunk) {
  if (p.dtype != kF32) throw std::invalid_argument("column_emulate: dtype must be float32");
  if (p.H != 32 && p.H != 64 && p.H != 128 && p.H != 256)
    throw std::invalid_argument("column_emulate: H must be 32, 64, 128 or 256");
  if (p.W % plane::ColumnGeom<32>::kRows != 0 || p.W <= 0)
    throw std::invalid_argument("column_emulate: W must be a positive multiple of 32");
  if (grid < 1) throw std::invalid_argument("column_emulate: grid must be >= 1");
  if (!p.a1.ptr) throw std::invalid_argument("column_emulate: a1 is required");
  if (chunk < 1) throw std::invalid_argument("column_emulate: chunk must be >= 1");
  const int64_t hw = p.H * p.W;
  // As the GPU runs a call: launches on chunks of planes, each with its own pointers.
  for (int64_t p0 = 0; p0 < p.planes; p0 += chunk) {
    auto at = [&](const void* base) { return base ? (float*)base + p0 * hw : nullptr; };
    const plane::ColumnJob job = plane::column_job(p, at(p.x1), at(p.x2), at(p.out),
                                                   at(p.noise_out), p0,
                                                   std::min(chunk, p.planes - p0));
    with_line_length(p.H, [&](auto size) {
      emulate_columns<decltype(size)::value>(job, p.planes, grid, reverse_threads);
    });
  }
}

void strip_emulate(const void* in, void* out, int64_t planes, int64_t rows, int64_t L,
                   bool inverse, int64_t grid, bool reverse_threads, bool fast, int in_dtype,
                   int out_dtype, bool same_layout, void* out2, int64_t split_rows,
                   const void* in2) {
  if (rows % 32 != 0) throw std::invalid_argument("strip_emulate: rows must be a multiple of 32");
  if (grid < 1) throw std::invalid_argument("strip_emulate: grid must be >= 1");
  if (L != 32 && L != 64 && L != 128 && L != 256)
    throw std::invalid_argument("strip_emulate: L must be 32, 64, 128 or 256");
  // The pairs the GPU instantiates for bfloat16 (cuda_fast_bf16.cu): one side float.
  if (!(in_dtype == kF32 && out_dtype == kF32) && !(in_dtype == kBF16 && out_dtype == kF32) &&
      !(in_dtype == kF32 && out_dtype == kBF16))
    throw std::invalid_argument(
        "strip_emulate: in_dtype, out_dtype must be float32, float32; bfloat16, float32; or "
        "float32, bfloat16");
  plane::StripJob job;
  job.in = in;
  job.out = out;
  job.planes = planes;
  job.rows = rows;
  job.inverse = inverse;
  if (out2 && (!same_layout || split_rows < 0 || split_rows > planes * rows))
    throw std::invalid_argument(
        "strip_emulate: out2 needs same_layout and 0 <= split_rows <= planes * rows");
  if (in2 && (split_rows < 0 || split_rows > planes * rows))
    throw std::invalid_argument("strip_emulate: in2 needs 0 <= split_rows <= planes * rows");
  job.in2 = in2;
  job.out2 = out2;
  job.split_rows = split_rows;
  auto run = [&](auto* tin, auto* tout) {
    using Tin = std::remove_pointer_t<decltype(tin)>;
    using Tout = std::remove_pointer_t<decltype(tout)>;
    with_line_length(L, [&](auto size) {
      emulate_strips<decltype(size)::value, Tin, Tout>(job, grid, reverse_threads, fast,
                                                       same_layout);
    });
  };
  if (in_dtype == kBF16)
    run((plane::EmuBf16*)nullptr, (float*)nullptr);
  else if (out_dtype == kBF16)
    run((float*)nullptr, (plane::EmuBf16*)nullptr);
  else
    run((float*)nullptr, (float*)nullptr);
}

void plane_emulate(const SpectralParams& p, int mode, int64_t grid, bool reverse_threads,
                   int split, bool fast, bool prefetch) {
  using plane::Geom;
  with_emu_io(p.dtype, "plane_emulate", [](auto*) {});
  if (p.H != p.W) throw std::invalid_argument("plane_emulate: square planes only");
  if (grid < 1) throw std::invalid_argument("plane_emulate: grid must be >= 1");
  if (p.H != 32 && p.H != 64 && p.H != 128)
    throw std::invalid_argument("plane_emulate: H = W must be 32, 64 or 128");
  if (split != 1 && !(split == 2 && (p.H == 64 || (p.H == 128 && !fast))) &&
      !(split == 4 && p.H == 64 && fast))
    throw std::invalid_argument(
        "plane_emulate: split must be 1, or 2 for H = W = 64 (and 128 with dense passes), or "
        "4 for H = W = 64 with fast passes");
  plane::Job job = plane::make_job(p, mode);
  // As the GPU's plan_for: prefetch is for float I/O only, asked for or not.
  job.prefetch = prefetch && p.dtype == kF32;
  const int64_t n = p.H;
  with_emu_io(p.dtype, "plane_emulate", [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    if (fast) {
      if (n == 32) emulate<Geom<32, 1, true>, T>(job, grid, reverse_threads);
      if (n == 64 && split == 1) emulate<Geom<64, 1, true>, T>(job, grid, reverse_threads);
      if (n == 64 && split == 2) emulate<Geom<64, 2, true>, T>(job, grid, reverse_threads);
      if (n == 64 && split == 4) emulate<Geom<64, 4, true>, T>(job, grid, reverse_threads);
      if (n == 128) emulate<Geom<128, 1, true>, T>(job, grid, reverse_threads);
      return;
    }
    if (n == 32) emulate<Geom<32>, T>(job, grid, reverse_threads);
    if (n == 64 && split == 1) emulate<Geom<64>, T>(job, grid, reverse_threads);
    if (n == 64 && split == 2) emulate<Geom<64, 2>, T>(job, grid, reverse_threads);
    if (n == 128 && split == 1) emulate<Geom<128>, T>(job, grid, reverse_threads);
    if (n == 128 && split == 2) emulate<Geom<128, 2>, T>(job, grid, reverse_threads);
  });
}

// Self-check of the checks above: toy block programs, each with one deliberate bug of a
// kind the emulator must catch, run through the same run_blocks and EmuCtx as the real
// programs. `fixed` runs the corrected program instead, so a test that sees the bug caught
// also sees that the correct program passes.
namespace {

constexpr int kToyThreads = 8;
constexpr int64_t kToyGrid = 2;
constexpr int64_t kToyFloats = kToyGrid * kToyThreads * 4;    // four floats per thread

// Block b's thread t reads input floats [4 i, 4 i + 4), i = b * kToyThreads + t, into its
// shared-memory slot t (floats [4 t, 4 t + 4)), and writes its output floats from there.
// out2: a second output where the program has one.
template <typename F>
void run_toy(const float* in, float* out, bool reverse, F&& program, float* out2 = nullptr) {
  std::vector<plane::EmuRange> memory;
  add_range(memory, "in", in, kToyFloats, false);
  add_range(memory, "out", out, kToyFloats, true);
  add_range(memory, "out2", out2, kToyFloats, true);
  run_blocks(kToyThreads * 4, kToyThreads, kToyGrid, reverse, memory,
             [&](EmuCtx& ctx, float* sm) {
               program(ctx, sm, ctx.block() * kToyThreads);   // the block's first thread index
             });
}

}  // namespace

std::vector<float> emulator_selfcheck(const std::string& program, bool fixed, bool reverse) {
  // Input 1, 2, 3, ...; then a 4-float gap that belongs to no buffer; then the output;
  // another gap, and room for a second output.
  std::vector<float> mem(3 * kToyFloats + 8, 0.f);
  float* in = mem.data();
  float* out = in + kToyFloats + 4;
  for (int64_t i = 0; i < kToyFloats; ++i) in[i] = float(i + 1);
  constexpr int T = kToyThreads;
  auto slot = [](float* sm, int t) { return sm + 4 * t; };
  auto load = [&](float* sm, int t, int64_t i0) {       // input -> slot t
    float v[4];
    plane::ld4(in + 4 * (i0 + t), v);
    plane::st4(slot(sm, t), v);
  };
  auto store = [&](float* sm, int t, int64_t i0) {      // slot t -> output
    float v[4];
    plane::ld4(slot(sm, t), v);
    plane::st4(out + 4 * (i0 + t), v);
  };

  if (program == "missing_barrier") {
    // Shift left: slot t takes slot t + 1's value (mod T). The bug reads the neighbour's
    // slot in the phase that overwrites it; the fix reads in one phase (into a register)
    // and writes in the next.
    run_toy(in, out, reverse, [&](EmuCtx& ctx, float* sm, int64_t i0) {
      auto reg = ctx.per_thread<std::array<float, 4>>();
      ctx.phase([&](int t) { load(sm, t, i0); });
      if (fixed) {
        ctx.phase([&](int t) { plane::ld4(slot(sm, (t + 1) % T), reg(t).data()); });
        ctx.phase([&](int t) { plane::st4(slot(sm, t), reg(t).data()); });
      } else {
        ctx.phase([&](int t) {
          plane::ld4(slot(sm, (t + 1) % T), reg(t).data());
          plane::st4(slot(sm, t), reg(t).data());
        });
      }
      ctx.phase([&](int t) { store(sm, t, i0); });
    });
  } else if (program == "unwritten_read") {
    // Copy through shared memory. The bug: the last thread of the last block skips its
    // write (the first block wrote that slot, so only a refill per block shows it).
    run_toy(in, out, reverse, [&](EmuCtx& ctx, float* sm, int64_t i0) {
      const bool skip = !fixed && ctx.block() == ctx.grid() - 1;
      ctx.phase([&](int t) {
        if (!(skip && t == T - 1)) load(sm, t, i0);
      });
      ctx.phase([&](int t) { store(sm, t, i0); });
    });
  } else if (program == "async_read_before_wait" || program == "async_never_waited") {
    // Copy through shared memory with copy16_async; the fix waits, then reads. The first
    // bug reads the slot before the thread's wait_async, the second never waits.
    const bool early = program == "async_read_before_wait";
    run_toy(in, out, reverse, [&](EmuCtx& ctx, float* sm, int64_t i0) {
      ctx.phase([&](int t) {
        ctx.copy16_async(slot(sm, t), in + 4 * (i0 + t));
        if (fixed) {
          ctx.wait_async();
          store(sm, t, i0);
        } else if (early) {
          store(sm, t, i0);
          ctx.wait_async();
        }
      });
      if (!fixed && !early) ctx.phase([&](int t) { store(sm, t, i0); });
    });
  } else if (program == "write_other_block") {
    // Copy through shared memory. The bug: block 0 also writes the output that block 1
    // owns (zeros), which block 1's own stores hide when it runs later.
    run_toy(in, out, reverse, [&](EmuCtx& ctx, float* sm, int64_t i0) {
      ctx.phase([&](int t) { load(sm, t, i0); });
      ctx.phase([&](int t) {
        store(sm, t, i0);
        if (!fixed && ctx.block() == 0) {
          const float zero[4] = {0.f, 0.f, 0.f, 0.f};
          plane::st4(out + 4 * (T + t), zero);
        }
      });
    });
  } else if (program == "read_outside" || program == "write_input") {
    // Copy the input to the output with ld4 and st4. The bugs: reading one chunk further
    // on (the last thread reads the gap after the input), and storing into the input.
    const int64_t shift = !fixed && program == "read_outside" ? 4 : 0;
    float* dst = !fixed && program == "write_input" ? in : out;
    run_toy(in, out, reverse, [&](EmuCtx& ctx, float*, int64_t i0) {
      ctx.phase([&](int t) {
        float v[4];
        plane::ld4(in + 4 * (i0 + t) + shift, v);
        plane::st4(dst + 4 * (i0 + t), v);
      });
    });
  } else if (program == "outputs_overlap") {
    // Copy the input to two outputs, out and out2, as the plane kernel writes out and
    // noise_out. The bug: out2 starts one chunk into out. Each write to out2 lies whole in
    // out, listed first; and in forward runs thread i + 1's store to out covers thread
    // i's store to out2, so the output comes out right.
    float* out2 = fixed ? out + kToyFloats + 4 : out + 4;
    run_toy(in, out, reverse, [&](EmuCtx& ctx, float*, int64_t i0) {
      ctx.phase([&](int t) {
        float v[4];
        plane::ld4(in + 4 * (i0 + t), v);
        plane::st4(out + 4 * (i0 + t), v);
        plane::st4(out2 + 4 * (i0 + t), v);
      });
    }, out2);
  } else {
    throw std::invalid_argument(
        "emulator_selfcheck: program must be missing_barrier, unwritten_read, "
        "async_read_before_wait, async_never_waited, write_other_block, read_outside, "
        "write_input or outputs_overlap");
  }
  return std::vector<float>(out, out + kToyFloats);
}

}  // namespace blurfast
