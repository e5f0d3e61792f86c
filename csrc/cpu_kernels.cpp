// CPU kernels: separable matrix DCT per plane, the fused spectral op, Philox normals.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "blurfast.h"
#include "common.h"

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

// y = Mh * x * Mw^T for one H x W plane, as two passes of row updates (axpy form,
// vectorizable without reassociation). row_m is Mw^T (W x W), col_m is Mh (H x H).
// Rows are updated RB at a time so that each matrix row loaded serves RB rows.
// NH/NW > 0 fix the sizes at compile time (the fast paths).
constexpr int RB = 4;

template <typename T, int NH, int NW>
__attribute__((always_inline)) inline void transform_plane_body(const T* x, T* y, int64_t H_,
                                                                int64_t W_, const T* row_m,
                                                                const T* col_m, T* tmp) {
  const int64_t H = NH > 0 ? NH : H_;
  const int64_t W = NW > 0 ? NW : W_;
  // Pass 1: tmp[r, :] = sum_i x[r, i] * row_m[i, :].
  int64_t r = 0;
  for (; r + RB <= H; r += RB) {
    T* t = tmp + r * W;
    for (int64_t l = 0; l < RB * W; ++l) t[l] = 0;
    for (int64_t i = 0; i < W; ++i) {
      const T* m = row_m + i * W;
      T v[RB];
      for (int j = 0; j < RB; ++j) v[j] = x[(r + j) * W + i];
      for (int64_t l = 0; l < W; ++l) {
        const T ml = m[l];
        for (int j = 0; j < RB; ++j) t[j * W + l] += v[j] * ml;
      }
    }
  }
  for (; r < H; ++r) {
    T* t = tmp + r * W;
    for (int64_t l = 0; l < W; ++l) t[l] = 0;
    for (int64_t i = 0; i < W; ++i) {
      const T v = x[r * W + i];
      const T* m = row_m + i * W;
      for (int64_t l = 0; l < W; ++l) t[l] += v * m[l];
    }
  }
  // Pass 2: y[k, :] = sum_r col_m[k, r] * tmp[r, :].
  int64_t k = 0;
  for (; k + RB <= H; k += RB) {
    T* yk = y + k * W;
    for (int64_t l = 0; l < RB * W; ++l) yk[l] = 0;
    for (int64_t rr = 0; rr < H; ++rr) {
      const T* t = tmp + rr * W;
      T c[RB];
      for (int j = 0; j < RB; ++j) c[j] = col_m[(k + j) * H + rr];
      for (int64_t l = 0; l < W; ++l) {
        const T tl = t[l];
        for (int j = 0; j < RB; ++j) yk[j * W + l] += c[j] * tl;
      }
    }
  }
  for (; k < H; ++k) {
    T* yk = y + k * W;
    for (int64_t l = 0; l < W; ++l) yk[l] = 0;
    for (int64_t rr = 0; rr < H; ++rr) {
      const T v = col_m[k * H + rr];
      const T* t = tmp + rr * W;
      for (int64_t l = 0; l < W; ++l) yk[l] += v * t[l];
    }
  }
}

// The same code compiled twice: for the baseline x86-64 (SSE2) and, chosen at run time
// where the CPU has them, for AVX2 with FMA (wider vectors, fused multiply-adds).
template <typename T, int NH, int NW>
void transform_plane(const T* x, T* y, int64_t H, int64_t W, const T* row_m, const T* col_m,
                     T* tmp) {
  transform_plane_body<T, NH, NW>(x, y, H, W, row_m, col_m, tmp);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BLURFAST_AVX2_CLONES 1
template <typename T, int NH, int NW>
__attribute__((target("avx2,fma"))) void transform_plane_avx2(const T* x, T* y, int64_t H,
                                                              int64_t W, const T* row_m,
                                                              const T* col_m, T* tmp) {
  transform_plane_body<T, NH, NW>(x, y, H, W, row_m, col_m, tmp);
}

// BLURFAST_CPU_KERNELS=baseline turns the AVX2 code off (read per call, for tests).
bool use_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* v = std::getenv("BLURFAST_CPU_KERNELS");
  return has && !(v && std::strcmp(v, "baseline") == 0);
}
#endif

template <typename T>
using PlaneFn = void (*)(const T*, T*, int64_t, int64_t, const T*, const T*, T*);

template <typename T, int NH, int NW>
PlaneFn<T> best_plane_fn() {
#ifdef BLURFAST_AVX2_CLONES
  if (use_avx2_fma()) return transform_plane_avx2<T, NH, NW>;
#endif
  return transform_plane<T, NH, NW>;
}

// Fast paths for square powers of two 8..256; the generic path for every other size.
template <typename T>
PlaneFn<T> plane_fn(int64_t H, int64_t W) {
  if (H == W) {
    switch (H) {
      case 8: return best_plane_fn<T, 8, 8>();
      case 16: return best_plane_fn<T, 16, 16>();
      case 32: return best_plane_fn<T, 32, 32>();
      case 64: return best_plane_fn<T, 64, 64>();
      case 128: return best_plane_fn<T, 128, 128>();
      case 256: return best_plane_fn<T, 256, 256>();
      default: break;
    }
  }
  return best_plane_fn<T, 0, 0>();
}

// A 2-D transform of one size and direction, with its matrices bound.
template <typename T>
struct Transform {
  PlaneFn<T> fn;
  int64_t H, W;
  const T *row_m, *col_m;
  Transform(int64_t H_, int64_t W_, bool inverse) : fn(plane_fn<T>(H_, W_)), H(H_), W(W_) {
    const DctTable<T>& th = dct_table<T>(H);
    const DctTable<T>& tw = dct_table<T>(W);
    // forward: y = C_H x C_W^T; inverse: y = C_H^T x C_W.
    row_m = inverse ? tw.c.data() : tw.ct.data();
    col_m = inverse ? th.ct.data() : th.c.data();
  }
  void operator()(const T* x, T* y, T* tmp) const { fn(x, y, H, W, row_m, col_m, tmp); }
};

// Runs body(first_plane, last_plane) over [0, planes) on up to num_threads threads.
template <typename F>
void parallel_planes(int64_t planes, int64_t plane_work, int num_threads, F body) {
  int64_t nt = num_threads > 0 ? num_threads : (int64_t)std::thread::hardware_concurrency();
  const int64_t min_work = 1 << 18;  // below this, threads cost more than they save
  nt = std::max<int64_t>(1, std::min({nt, planes, planes * plane_work / min_work}));
  if (nt <= 1) {
    if (planes > 0) body(0, planes);
    return;
  }
  std::vector<std::thread> pool;
  std::exception_ptr err;
  std::mutex err_mu;
  for (int64_t t = 0; t < nt; ++t) {
    int64_t lo = planes * t / nt, hi = planes * (t + 1) / nt;
    pool.emplace_back([&, lo, hi] {
      try {
        body(lo, hi);
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_mu);
        err = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  if (err) std::rethrow_exception(err);
}

template <typename T>
void dct2_impl(const T* in, T* out, int64_t planes, int64_t H, int64_t W, bool inverse,
               int num_threads) {
  const int64_t hw = H * W;
  Transform<T> tr(H, W, inverse);
  parallel_planes(planes, hw * (H + W), num_threads, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(hw);
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
  parallel_planes(sp.planes, hw * (H + W) * 4, num_threads, [&](int64_t lo, int64_t hi) {
    std::vector<T> tmp(hw), z(hw), f(hw), zb(hw);
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
          philox_normal_fill(sp.seed, sp.offset + (uint64_t)(p * hw), hw, zb.data());
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

void normal_cpu(void* out, int64_t n, int dtype, uint64_t seed, uint64_t offset) {
  check_cpu_dtype(dtype);
  if (dtype == kF64)
    philox_normal_fill(seed, offset, n, static_cast<double*>(out));
  else
    philox_normal_fill(seed, offset, n, static_cast<float*>(out));
}

}  // namespace blurfast
