// CPU kernels: separable DCT per plane, the fused spectral op, Philox normals.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "blurfast.h"
#include "common.h"
#include "cpu_vector_passes.h"

namespace blurfast {
namespace {

// DCT-II matrix C (n x n, C[k*n+i]) and its transpose, cached per (n, type).
template <typename T>
struct DctTable {
  std::vector<T> c, ct;
  explicit DctTable(int64_t n) : c(n * n), ct(n * n) {
    for (int64_t k = 0; k < n; ++k)
      for (int64_t i = 0; i < n; ++i) c[k * n + i] = ct[i * n + k] = (T)dct_coef(k, i, n);
  }
};

template <typename T>
const DctTable<T>& dct_table(int64_t n) {
  static std::mutex mu;
  static std::map<int64_t, std::unique_ptr<DctTable<T>>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = cache[n];
  if (!slot) slot.reset(new DctTable<T>(n));
  return *slot;
}

// y = Mh * x * Mw^T for one H x W plane of any size, as two passes of row updates (axpy
// form, vectorizable without reassociation). row_m is Mw^T (W x W), col_m is Mh (H x H),
// both double. Sums of up to 512 terms in order, in T, had up to 3x (float) and 2.3x
// (double) the error of torch's blocked matrix products at sides such as 513 and 384, so
// the sums are wider than T, rounded to T once: for float a double sum
// (transform_plane_body); for double Ogita, Rump and Oishi's Dot2, as the CUDA simple
// kernels' DotSum<double> (common.h), in two arrays, sums s and error terms c
// (transform_plane_dot2; the first pass's s + c feeds the second whole). Dot2 replaced
// x87 long double sums (scalar) at the same accuracy: float64 16x3x100x100 dct2 5 to 8
// times faster in the AVX2 build, 1.8 to 2.3 times in the baseline (benchmarks/LOG.md,
// session 24). The float sums update rows RB at a time, so that each matrix row loaded
// serves RB rows.
constexpr int RB = 4;

// acc: H * W + RB * W sums (the first pass's result, then RB rows of the second's).
template <typename T>
__attribute__((always_inline)) inline void transform_plane_body(const T* x, T* y, int64_t H,
                                                                int64_t W, const double* row_m,
                                                                const double* col_m,
                                                                double* acc) {
  using A = double;
  // Pass 1: tmp[r, :] = sum_i x[r, i] * row_m[i, :].
  A* const tmp = acc;
  int64_t r = 0;
  for (; r + RB <= H; r += RB) {
    A* t = tmp + r * W;
    for (int64_t l = 0; l < RB * W; ++l) t[l] = 0;
    for (int64_t i = 0; i < W; ++i) {
      const double* m = row_m + i * W;
      A v[RB];
      for (int j = 0; j < RB; ++j) v[j] = (A)x[(r + j) * W + i];
      for (int64_t l = 0; l < W; ++l) {
        const A ml = m[l];
        for (int j = 0; j < RB; ++j) t[j * W + l] += v[j] * ml;
      }
    }
  }
  for (; r < H; ++r) {
    A* t = tmp + r * W;
    for (int64_t l = 0; l < W; ++l) t[l] = 0;
    for (int64_t i = 0; i < W; ++i) {
      const A v = (A)x[r * W + i];
      const double* m = row_m + i * W;
      for (int64_t l = 0; l < W; ++l) t[l] += v * m[l];
    }
  }
  // Pass 2: y[k, :] = sum_r col_m[k, r] * tmp[r, :], RB rows at a time in rows_k.
  A* const rows_k = acc + H * W;
  for (int64_t k = 0; k < H; k += RB) {
    const int nb = (int)std::min<int64_t>(RB, H - k);
    for (int64_t l = 0; l < nb * W; ++l) rows_k[l] = 0;
    for (int64_t rr = 0; rr < H; ++rr) {
      const A* t = tmp + rr * W;
      A c[RB] = {};
      for (int j = 0; j < nb; ++j) c[j] = col_m[(k + j) * H + rr];
      if (nb == RB) {
        for (int64_t l = 0; l < W; ++l) {
          const A tl = t[l];
          for (int j = 0; j < RB; ++j) rows_k[j * W + l] += c[j] * tl;
        }
      } else {
        for (int j = 0; j < nb; ++j)
          for (int64_t l = 0; l < W; ++l) rows_k[j * W + l] += c[j] * t[l];
      }
    }
    for (int64_t l = 0; l < nb * W; ++l) y[k * W + l] = (T)rows_k[l];
  }
}

// a = h + l exactly, h with at most 26 significant bits (Veltkamp's split; for |a| near
// 2^997 and above, 134217729 a overflows and h, l are not finite, so transform_plane_dot2
// scales such planes down).
struct Halves {
  double h, l;
};
__attribute__((always_inline)) inline Halves split_halves(double a) {
  const double t = 134217729.0 * a, h = t - (t - a);  // 2^27 + 1
  return {h, a - h};
}

// e = a b - p exactly, p = a b rounded: by an fma (Fma), else Dekker's product of the
// halves (the baseline x86-64 has no fma instruction: std::fma would be a libm call per
// term). Both need p uncontracted (the callers are compiled with fp-contract=off).
template <bool Fma>
__attribute__((always_inline)) inline double product_error(double a, double b, double p,
                                                           const Halves& ah, const Halves& bh) {
  if constexpr (Fma) return std::fma(a, b, -p);
  return ((ah.h * bh.h - p) + ah.h * bh.l + ah.l * bh.h) + ah.l * bh.l;
}

template <bool Fma>
__attribute__((always_inline)) inline Halves halves_if_dekker(double a) {
  if constexpr (Fma) return {a, 0.0};
  return split_halves(a);
}

// (s + c)[l] = sum_i v[i] (m + mc)[i, l] for l < W by Dot2: the products v[i] m[i, l],
// rounded, and their exact errors; the error terms mc (the first pass's c, when MC) by
// plain products, their own errors being second order. m, mc: n x W, row-major. One
// output row at a time, so that the loop over l vectorizes (with RB rows interleaved as
// in transform_plane_body, GCC 12 left it scalar).
template <bool Fma, bool MC>
__attribute__((always_inline)) inline void dot2_row(const double* v, int64_t n, int64_t W,
                                                    const double* m, const double* mc,
                                                    double* s, double* c, double v_scale) {
  for (int64_t l = 0; l < W; ++l) s[l] = c[l] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double vi = v[i] * v_scale;
    const Halves vh = halves_if_dekker<Fma>(vi);
    const double* mi = m + i * W;
    const double* mci = MC ? mc + i * W : nullptr;
    for (int64_t l = 0; l < W; ++l) {
      const double ml = mi[l], p = vi * ml;
      double e = product_error<Fma>(vi, ml, p, vh, halves_if_dekker<Fma>(ml));
      if constexpr (MC) e += vi * mci[l];
      dot2_step(s[l], c[l], p, e);
    }
  }
}

// transform_plane_body for double with Dot2 sums (Fma: how the products' errors are
// found). acc: the first pass's sums ts and errors tc (H * W each), then one row of the
// second's, ks and kc (W each). Callers are compiled with fp-contract=off.
template <bool Fma>
__attribute__((always_inline)) inline void transform_plane_dot2(const double* x, double* y,
                                                                int64_t H, int64_t W,
                                                                const double* row_m,
                                                                const double* col_m,
                                                                double* acc) {
  double* const ts = acc;
  double* const tc = acc + H * W;
  // Dekker's splits overflow from 2^996: a plane reaching 2^980 (its first pass's sums
  // reaching 2^980 sqrt(W)) is transformed as x 2^-100 and its result scaled back. Exact
  // but for inputs under 2^-922, whose rounding to subnormals stays far below the error
  // bound that the large entries set.
  double scale = 1.0, unscale = 1.0;
  if constexpr (!Fma) {
    double big = 0.0;
    for (int64_t i = 0; i < H * W; ++i) big = std::fmax(big, std::fabs(x[i]));
    if (big >= 0x1p980) scale = 0x1p-100, unscale = 0x1p100;
  }
  // Pass 1: (ts + tc)[r, :] = sum_i x[r, i] row_m[i, :].
  for (int64_t r = 0; r < H; ++r)
    dot2_row<Fma, false>(x + r * W, W, W, row_m, nullptr, ts + r * W, tc + r * W, scale);
  // Pass 2: y[k, :] = sum_r col_m[k, r] (ts + tc)[r, :], rounded once.
  double* const ks = acc + 2 * H * W;
  double* const kc = ks + W;
  for (int64_t k = 0; k < H; ++k) {
    dot2_row<Fma, true>(col_m + k * H, H, W, ts, tc, ks, kc, 1.0);
    for (int64_t l = 0; l < W; ++l) y[k * W + l] = (ks[l] + kc[l]) * unscale;
  }
}

// Plane transforms. Vector: planes whose sides are powers of two 8..256, a column pass
// then a row pass (cpu_vector_passes.h). Generic: dense products (any other H, W). Both
// are compiled twice: for the baseline x86-64 (SSE2) and, chosen at run time where the
// CPU has them, for AVX2 with FMA.
template <typename T>
using PassFn = void (*)(const T*, T*, int64_t);

template <typename T>
struct PlaneArgs {
  int64_t H, W;
  const double *row_m, *col_m;  // generic
  PassFn<T> column, row;        // vector: along H, then along W
};

template <typename T>
using PlaneFn = void (*)(const T*, T*, const PlaneArgs<T>&, T*);

// The second pass works in place on the first one's output.
template <typename T>
void vector_plane(const T* x, T* y, const PlaneArgs<T>& a, T*) {
  a.column(x, y, a.W);
  a.row(y, y, a.H);
}

// FVEC, DVEC: the build's float and double vector types (16 bytes baseline, 32 AVX2).
// FMA: whether Dot2 finds the products' errors by fmas (else Dekker's product).
#define BLURFAST_PLANE_FNS(SUFFIX, ATTR, FMA, FVEC, DVEC)                                  \
  template <typename T>                                                                    \
  ATTR void generic_plane##SUFFIX(const T* x, T* y, const PlaneArgs<T>& a, T* tmp) {       \
    transform_plane_body<T>(x, y, a.H, a.W, a.row_m, a.col_m, reinterpret_cast<double*>(tmp)); \
  }                                                                                        \
  /* fp-contract=off: a rounded product merged into the addition after it, an fma, would */ \
  /* break Dot2's exact error terms (GCC contracts by default in gnu++17) */                \
  template <>                                                                              \
  ATTR __attribute__((optimize("fp-contract=off"))) void generic_plane##SUFFIX<double>(    \
      const double* x, double* y, const PlaneArgs<double>& a, double* tmp) {               \
    transform_plane_dot2<FMA>(x, y, a.H, a.W, a.row_m, a.col_m, tmp);                      \
  }                                                                                        \
  /* flatten: inlined here, so it is compiled for this function's target */               \
  ATTR __attribute__((flatten)) void normal_fill##SUFFIX(uint64_t seed, uint64_t e0,        \
                                                         int64_t n, float* out) {          \
    philox_normal_fill<float>(seed, e0, n, out);                                           \
  }                                                                                        \
  template <typename T>                                                                    \
  using Vec##SUFFIX = std::conditional_t<std::is_same<T, float>::value, cpuvec::FVEC,       \
                                         cpuvec::DVEC>;                                    \
  template <typename T, int N, bool Inverse>                                               \
  ATTR __attribute__((flatten)) void column_pass##SUFFIX(const T* in, T* out, int64_t w) { \
    cpuvec::column_pass<Vec##SUFFIX<T>, N, Inverse>(in, out, w);                           \
  }                                                                                        \
  template <typename T, int N, bool Inverse>                                               \
  ATTR __attribute__((flatten)) void row_pass##SUFFIX(const T* in, T* out, int64_t rows) { \
    cpuvec::row_pass<Vec##SUFFIX<T>, N, Inverse>(in, out, rows);                           \
  }

// The baseline build has fmas in hardware only where the compiler was told so (-mfma).
#ifdef __FP_FAST_FMA
BLURFAST_PLANE_FNS(, , true, F4, D2)
#else
BLURFAST_PLANE_FNS(, , false, F4, D2)
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLURFAST_AVX2_CLONES 1
BLURFAST_PLANE_FNS(_avx2, __attribute__((target("avx2,fma"))), true, F8, D4)

// BLURFAST_CPU_KERNELS=baseline turns the AVX2 code off (read per call, for tests).
bool use_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* v = std::getenv("BLURFAST_CPU_KERNELS");
  return has && !(v && std::strcmp(v, "baseline") == 0);
}
#endif
#undef BLURFAST_PLANE_FNS

// out[i] = philox_normal<T>(seed, e0 + i): float through the AVX2 build where it runs (the
// fmas of box_muller_f inline there; the bits are the same either way).
inline void fill_normals(uint64_t seed, uint64_t e0, int64_t n, float* out) {
#ifdef BLURFAST_AVX2_CLONES
  if (use_avx2_fma()) return normal_fill_avx2(seed, e0, n, out);
#endif
  normal_fill(seed, e0, n, out);
}

inline void fill_normals(uint64_t seed, uint64_t e0, int64_t n, double* out) {
  philox_normal_fill<double>(seed, e0, n, out);
}

// The vector pass of length n along columns (Row: along rows), or null for other n.
template <typename T, bool Inverse, bool Row>
PassFn<T> vector_pass(int64_t n) {
#ifdef BLURFAST_AVX2_CLONES
#define BF_PICK(N)                                                                        \
  return Row ? (use_avx2_fma() ? row_pass_avx2<T, N, Inverse> : row_pass<T, N, Inverse>)  \
             : (use_avx2_fma() ? column_pass_avx2<T, N, Inverse>                          \
                               : column_pass<T, N, Inverse>)
#else
#define BF_PICK(N) return Row ? row_pass<T, N, Inverse> : column_pass<T, N, Inverse>
#endif
  switch (n) {
    case 8: BF_PICK(8);
    case 16: BF_PICK(16);
    case 32: BF_PICK(32);
    case 64: BF_PICK(64);
    case 128: BF_PICK(128);
    case 256: BF_PICK(256);
    default: return nullptr;
  }
#undef BF_PICK
}

template <typename T>
PlaneFn<T> generic_fn() {
#ifdef BLURFAST_AVX2_CLONES
  if (use_avx2_fma()) return generic_plane_avx2<T>;
#endif
  return generic_plane<T>;
}

// Rough one-thread costs in nanoseconds, read off this project's 2-core EPYC (AVX2 build,
// float; double takes twice as long): what parallel_planes weighs against starting a
// thread (60 to 80 µs there).
constexpr double kNsPerButterfly = 0.1;   // vector passes: per element and log2 stage
constexpr double kNsPerMultiplyAdd = 0.1; // matrix products
constexpr double kNsPerNormal = 3.0;      // a float normal (Philox + Box-Muller)

// A 2-D transform of one size and direction. `tmp` of the call holds tmp_elems elements;
// `ns` is the rough cost of one plane.
template <typename T>
struct Transform {
  PlaneFn<T> fn;
  PlaneArgs<T> args{};
  double ns;
  int64_t tmp_elems = 0;
  Transform(int64_t H, int64_t W, bool inverse) {
    const double hw = (double)(H * W), width = sizeof(T) / 4;
    args.H = H;
    args.W = W;
    args.column = inverse ? vector_pass<T, true, false>(H) : vector_pass<T, false, false>(H);
    args.row = inverse ? vector_pass<T, true, true>(W) : vector_pass<T, false, true>(W);
    if (args.column && args.row) {
      fn = vector_plane<T>;
      ns = kNsPerButterfly * width * hw * (std::log2((double)H) + std::log2((double)W));
      return;
    }
    // forward: y = C_H x C_W^T; inverse: y = C_H^T x C_W.
    const DctTable<double>& th = dct_table<double>(H);
    const DctTable<double>& tw = dct_table<double>(W);
    args.row_m = inverse ? tw.c.data() : tw.ct.data();
    args.col_m = inverse ? th.ct.data() : th.c.data();
    fn = generic_fn<T>();
    // wider sums: double for float (half the vector lanes), Dot2 for double (about 4x
    // float's time)
    ns = kNsPerMultiplyAdd * (sizeof(T) == 4 ? 2 : 8) * hw * (double)(H + W);
    // the sums in T elements: H * W + RB * W doubles for float (transform_plane_body),
    // twice that for double (transform_plane_dot2); a std::vector<T>'s data is aligned
    // for doubles
    tmp_elems = 2 * (H * W + RB * W);
  }
  void operator()(const T* x, T* y, T* tmp) const { fn(x, y, args, tmp); }
};

// Runs body(first_plane, last_plane) over [0, planes) on up to num_threads threads (the
// caller's among them), each given at least kMinThreadNs of work by plane_ns, the rough
// cost of one plane.
constexpr double kMinThreadNs = 2e6;

template <typename F>
void parallel_planes(int64_t planes, double plane_ns, int num_threads, F body) {
  int64_t nt = num_threads > 0 ? num_threads : (int64_t)std::thread::hardware_concurrency();
  nt = std::max<int64_t>(
      1, std::min({nt, planes, (int64_t)((double)planes * plane_ns / kMinThreadNs)}));
  if (nt <= 1) {
    if (planes > 0) body(0, planes);
    return;
  }
  std::vector<std::thread> pool;
  std::exception_ptr err;
  std::mutex err_mu;
  auto run = [&](int64_t t) {
    try {
      body(planes * t / nt, planes * (t + 1) / nt);
    } catch (...) {
      std::lock_guard<std::mutex> lock(err_mu);
      err = std::current_exception();
    }
  };
  for (int64_t t = 1; t < nt; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  if (err) std::rethrow_exception(err);
}

template <typename T>
void dct2_impl(const T* in, T* out, int64_t planes, int64_t H, int64_t W, bool inverse,
               int num_threads) {
  const int64_t hw = H * W;
  Transform<T> tr(H, W, inverse);
  parallel_planes(planes, tr.ns, num_threads, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(tr.tmp_elems);
    for (int64_t p = lo; p < hi; ++p) tr(in + p * hw, out + p * hw, tmp.data());
  });
}

template <typename T>
const T* map_ptr(const MapRef& m, int64_t p, int64_t hw) {
  return static_cast<const T*>(m.ptr) + map_plane(p, m.div, m.mod) * hw;
}

template <typename T>
void spectral_impl(const SpectralParams& sp, int num_threads) {
  const int64_t H = sp.H, W = sp.W, hw = H * W;
  Transform<T> fwd(H, W, false), inv(H, W, true);
  const T* x1 = static_cast<const T*>(sp.x1);
  const T* x2 = static_cast<const T*>(sp.x2);
  const T* zb_given = static_cast<const T*>(sp.zb);
  T* out = static_cast<T*>(sp.out);
  T* noise_out = static_cast<T*>(sp.noise_out);
  const bool need_zb = sp.g.ptr != nullptr || noise_out != nullptr;
  const double plane_ns = fwd.ns * (x2 ? 2 : 1) + inv.ns * (noise_out ? 2 : 1) +
                          (need_zb && !zb_given ? kNsPerNormal * (double)hw : 0.0);
  parallel_planes(sp.planes, plane_ns, num_threads, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(std::max(fwd.tmp_elems, inv.tmp_elems)), z(hw), f(x2 ? hw : 0),
        zb(need_zb ? hw : 0);
    for (int64_t p = lo; p < hi; ++p) {
      fwd(x1 + p * hw, z.data(), tmp.data());
      const T* a1 = map_ptr<T>(sp.a1, p, hw);
      for (int64_t i = 0; i < hw; ++i) z[i] *= a1[i];
      if (x2) {
        fwd(x2 + p * hw, f.data(), tmp.data());
        const T* a2 = map_ptr<T>(sp.a2, p, hw);
        for (int64_t i = 0; i < hw; ++i) z[i] += a2[i] * f[i];
      }
      if (need_zb) {
        if (zb_given) {
          std::copy(zb_given + p * hw, zb_given + (p + 1) * hw, zb.begin());
        } else {
          fill_normals(sp.seed, sp.offset + (uint64_t)(p * hw), hw, zb.data());
        }
        if (sp.g.ptr) {
          const T* g = map_ptr<T>(sp.g, p, hw);
          for (int64_t i = 0; i < hw; ++i) z[i] += g[i] * zb[i];
        }
        if (noise_out) inv(zb.data(), noise_out + p * hw, tmp.data());
      }
      inv(z.data(), out + p * hw, tmp.data());
    }
  });
}

void check_cpu_dtype(int dtype) {
  if (dtype != kF32 && dtype != kF64)
    throw std::invalid_argument("blurfast CPU kernels take float32 or float64");
}

}  // namespace

void dct2_cpu(const void* in, void* out, int64_t planes, int64_t H, int64_t W, int dtype,
              bool inverse, int num_threads) {
  check_cpu_dtype(dtype);
  if (dtype == kF64)
    dct2_impl((const double*)in, (double*)out, planes, H, W, inverse, num_threads);
  else
    dct2_impl((const float*)in, (float*)out, planes, H, W, inverse, num_threads);
}

void spectral_cpu(const SpectralParams& p, int num_threads) {
  check_cpu_dtype(p.dtype);
  if (p.dtype == kF64)
    spectral_impl<double>(p, num_threads);
  else
    spectral_impl<float>(p, num_threads);
}

const char* cpu_build() {
#ifdef BLURFAST_AVX2_CLONES
  return use_avx2_fma() ? "avx2" : "baseline";
#else
  return "portable";  // not x86-64: one build, 4-lane vectors
#endif
}

void normal_cpu(void* out, int64_t n, int dtype, uint64_t seed, uint64_t offset) {
  check_cpu_dtype(dtype);
  if (dtype == kF64)
    fill_normals(seed, offset, n, static_cast<double*>(out));
  else
    fill_normals(seed, offset, n, static_cast<float*>(out));
}

}  // namespace blurfast
