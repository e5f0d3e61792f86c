// The CPU's passes for power-of-two sides 8 .. 256: fast_dct.h's O(N log N) 1-D transforms
// run on vectors of L floats or doubles, one line per lane (GCC / Clang vector extensions;
// cpu_kernels.cpp compiles them for baseline x86-64 with 16-byte vectors and for
// AVX2 + FMA with 32-byte ones).
// - A pass along columns loads L adjacent columns as one vector per row.
// - A pass along rows takes L rows at a time and transposes L x L blocks in registers on
//   the way in and on the way out.
// Each pass reads its L lines whole before writing them, so in and out may be the same.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "fast_dct.h"

namespace blurfast {
namespace cpuvec {

// 32 bytes for the AVX2 build, 16 for the baseline (SSE2) one, where 32-byte shuffles
// would be done element by element.
typedef float F8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));
typedef double D4 __attribute__((vector_size(32)));
typedef double D2 __attribute__((vector_size(16)));

template <typename V>
using lane_t = typename fastdct::Lane<V>::type;

template <typename V>
constexpr int lanes = sizeof(V) / sizeof(lane_t<V>);

template <typename V>
inline V load(const lane_t<V>* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline void store(lane_t<V>* p, const V& v) { std::memcpy(p, &v, sizeof v); }

// Lane c of the two results of a transpose round exchanging row bit M with column bit M,
// as an index into the concatenation of rows a = r[i] and b = r[i | M] (L lanes each).
constexpr int round_lo(int L, int M, int c) { return (c & M) ? L + (c & ~M) : (c & ~M); }
constexpr int round_hi(int L, int M, int c) { return (c & M) ? L + (c | M) : (c | M); }

template <int M, typename V, int... C>
inline void transpose_round(V* r, std::integer_sequence<int, C...>) {
  constexpr int L = lanes<V>;
  for (int i = 0; i < L; ++i) {
    if (i & M) continue;
    const V a = r[i], b = r[i | M];
#if defined(__clang__)
    r[i] = __builtin_shufflevector(a, b, round_lo(L, M, C)...);
    r[i | M] = __builtin_shufflevector(a, b, round_hi(L, M, C)...);
#else  // GCC before 12 has only __builtin_shuffle, with a mask of lane-sized integers
    using I = std::conditional_t<sizeof(lane_t<V>) == 4, int32_t, int64_t>;
    typedef I Mask __attribute__((vector_size(sizeof(V))));
    r[i] = __builtin_shuffle(a, b, Mask{round_lo(L, M, C)...});
    r[i | M] = __builtin_shuffle(a, b, Mask{round_hi(L, M, C)...});
#endif
  }
}

// Transposes the L x L block r[row][column] in place, one round per bit of the index.
template <typename V>
inline void transpose(V* r) {
  constexpr int L = lanes<V>;
  using Lanes = std::make_integer_sequence<int, L>;
  transpose_round<1>(r, Lanes{});
  if constexpr (L >= 4) transpose_round<2>(r, Lanes{});
  if constexpr (L >= 8) transpose_round<4>(r, Lanes{});
}

// The orthonormal DCT-II (Inverse: its transpose, DCT-III) of the N lines in x, in place.
template <int N, bool Inverse, typename V>
inline void transform(V* x) {
  constexpr int E = 1 - fastdct::log2i(N), E0 = -fastdct::log2i(N);
  if constexpr (Inverse)
    fastdct::dct3<N, E, E0>(x);
  else
    fastdct::dct2<N, E, E0>(x);
}

// Along the columns of an N x w block (rows of w elements, w a multiple of the lanes).
template <typename V, int N, bool Inverse>
inline void column_pass(const lane_t<V>* in, lane_t<V>* out, int64_t w) {
  for (int64_t c = 0; c < w; c += lanes<V>) {
    V x[N];
    for (int n = 0; n < N; ++n) x[n] = load<V>(in + n * w + c);
    transform<N, Inverse>(x);
    for (int k = 0; k < N; ++k) store(out + k * w + c, x[k]);
  }
}

// Along the rows of a rows x N block (rows a multiple of the lanes).
template <typename V, int N, bool Inverse>
inline void row_pass(const lane_t<V>* in, lane_t<V>* out, int64_t rows) {
  constexpr int L = lanes<V>;
  for (int64_t r = 0; r < rows; r += L) {
    V x[N];
    for (int b = 0; b < N; b += L) {
      for (int j = 0; j < L; ++j) x[b + j] = load<V>(in + (r + j) * N + b);
      transpose(x + b);
    }
    transform<N, Inverse>(x);
    for (int b = 0; b < N; b += L) {
      transpose(x + b);
      for (int j = 0; j < L; ++j) store(out + (r + j) * N + b, x[b + j]);
    }
  }
}

}  // namespace cpuvec
}  // namespace blurfast
