// bfloat16 I/O for the CPU emulator (emulate.cpp): a host-side stand-in for CUDA's
// __nv_bfloat16, with the load4 / store4 / store1 of line_passes.h converting as
// cuda_fast_kernels.cuh does on the GPU, so the emulator runs the programs' 16-bit I/O
// branches (no prefetch in plane_program.h, the strip programs' mixed in/out types).
//
// - bfloat16 -> float is exact: the 16 bits are the float's high half.
// - float -> bfloat16 rounds to nearest, ties to even, as __float2bfloat16_rn and
//   __floats2bfloat162_rn; overflow rounds to infinity. A NaN becomes 0x7fff, the
//   canonical NaN the CUDA conversion gives (sign and payload dropped).
// - Every access goes through emu_check with its true size: 8 bytes for four elements,
//   2 for one; four elements also through emu_check_aligned (the GPU's 8-byte vector
//   access needs an 8-byte address). They read and write element by element.
//
// Host only: emulate.cpp is the one file that includes it.
#pragma once
#ifdef __CUDACC__
#error "emu_bf16.h is for the host-only emulator (emulate.cpp)"
#endif
#include <cstdint>
#include <cstring>

#include "line_passes.h"

namespace blurfast {
namespace plane {

struct EmuBf16 {
  uint16_t bits;
};
static_assert(sizeof(EmuBf16) == 2, "EmuBf16 must be 2 bytes, as __nv_bfloat16");

inline float bf16_to_float(EmuBf16 b) {
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline EmuBf16 float_to_bf16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return EmuBf16{0x7fff};
  // Adding 0x7fff, plus 1 when the kept half is odd, carries into it exactly when the
  // dropped half is above half an ulp, or exactly half with an odd kept half.
  u += 0x7fffu + ((u >> 16) & 1u);
  return EmuBf16{(uint16_t)(u >> 16)};
}

template <> inline void load4<EmuBf16>(const EmuBf16* p, float v[4]) {
  emu_check(p, 4 * sizeof(EmuBf16), false);
  emu_check_aligned(p, 4 * sizeof(EmuBf16));
  for (int q = 0; q < 4; ++q) v[q] = bf16_to_float(p[q]);
}

template <> inline void store4<EmuBf16>(EmuBf16* p, const float v[4]) {
  emu_check(p, 4 * sizeof(EmuBf16), true);
  emu_check_aligned(p, 4 * sizeof(EmuBf16));
  for (int q = 0; q < 4; ++q) p[q] = float_to_bf16_rn(v[q]);
}

template <> inline void store1<EmuBf16>(EmuBf16* p, float v) {
  emu_check(p, sizeof(EmuBf16), true);
  *p = float_to_bf16_rn(v);
}

}  // namespace plane
}  // namespace blurfast
