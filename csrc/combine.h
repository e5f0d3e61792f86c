// The frequency-space step of the transform-by-transform CUDA path (cuda_kernels.cu: the
// calls neither the whole-plane kernel nor the column path serves, 256 x 256 with
// BLURFAST_CUDA_KERNELS=fast+separate among them):
//   f1 = a1 f1 + a2 f2 + g zb, in place;  zb_out = zb when asked.
// A work item is a quad: four consecutive elements of one plane. Its elements share one
// Philox block (when the stream position is a multiple of 4, as it is for planes whose
// size is) and the planes' map offsets, so a quad costs a quarter of the normals and of
// the 64-bit index divisions of four single elements. The CPU emulator (emulate.cpp)
// runs the same function over every quad, so its indexing is tested without a GPU.
#pragma once
#include <cstdint>

#include "blurfast.h"
#include "common.h"
#include "line_passes.h"

namespace blurfast {

template <typename C>
struct CombineJob {
  C* f1 = nullptr;
  const C* f2 = nullptr;           // with a2
  MapRef a1, a2, g;                // g optional
  const C* zb = nullptr;           // given noise; else Philox (seed, offset + flat index)
  C* zb_out = nullptr;             // optional
  uint64_t seed = 0, offset = 0;
  int64_t planes = 0, hw = 0;
  // hw % 4 == 0 and every pointer 16-byte aligned: quads move as vectors on the GPU.
  bool vec = false;
};

// The combine of call p with workspace f1, f2 (null without x2) and zb_out (null unless
// the noise is returned).
template <typename C>
inline CombineJob<C> combine_job(const SpectralParams& p, C* f1, const C* f2, C* zb_out) {
  CombineJob<C> j;
  j.f1 = f1;
  j.f2 = f2;
  j.a1 = p.a1;
  if (f2) j.a2 = p.a2;
  j.g = p.g;
  j.zb = (const C*)p.zb;
  j.zb_out = zb_out;
  j.seed = p.seed;
  j.offset = p.offset;
  j.planes = p.planes;
  j.hw = p.H * p.W;
  j.vec = j.hw % 4 == 0;
  for (const void* q : {(const void*)j.f1, (const void*)j.f2, j.a1.ptr, j.a2.ptr, j.g.ptr,
                        (const void*)j.zb, (const void*)j.zb_out})
    if ((uintptr_t)q % 16 != 0) j.vec = false;
  return j;
}

// Quads per plane.
template <typename C>
BF_HD int64_t combine_quads(const CombineJob<C>& job) { return (job.hw + 3) / 4; }

// v[q] = p[q] for q < n (n = 4 with vec: one or two 16-byte loads on the GPU).
template <typename C>
BF_HD void load_quad(const C* p, C v[4], int n, bool vec) {
#ifdef __CUDA_ARCH__
  if (vec) {
    if constexpr (sizeof(C) == 4) {
      const float4 t = *reinterpret_cast<const float4*>(p);
      v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
    } else {
      const double2 t = reinterpret_cast<const double2*>(p)[0];
      const double2 u = reinterpret_cast<const double2*>(p)[1];
      v[0] = t.x; v[1] = t.y; v[2] = u.x; v[3] = u.y;
    }
    return;
  }
#else
  plane::emu_check(p, n * sizeof(C), false);
  if (vec) plane::emu_check_aligned(p, 16);
#endif
  BF_UNROLL for (int q = 0; q < 4; ++q) v[q] = q < n ? p[q] : C(0);
}

template <typename C>
BF_HD void store_quad(C* p, const C v[4], int n, bool vec) {
#ifdef __CUDA_ARCH__
  if (vec) {
    if constexpr (sizeof(C) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
      reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
    }
    return;
  }
#else
  plane::emu_check(p, n * sizeof(C), true);
  if (vec) plane::emu_check_aligned(p, 16);
#endif
  BF_UNROLL for (int q = 0; q < 4; ++q)
    if (q < n) p[q] = v[q];
}

// The planes of the maps that data plane p uses (64-bit divisions: once per plane).
template <typename C>
struct PlaneMaps {
  const C* a1;
  const C* a2;
  const C* g;
  BF_HD PlaneMaps(const CombineJob<C>& job, int64_t p) {
    auto at = [&](const MapRef& m) {
      return m.ptr ? (const C*)m.ptr + map_plane(p, m.div, m.mod) * job.hw : nullptr;
    };
    a1 = at(job.a1);
    a2 = at(job.a2);
    g = at(job.g);
  }
};

// Quad k (< combine_quads) of plane p (< planes), whose maps are `maps`.
template <typename C>
BF_HD void combine_quad(const CombineJob<C>& job, const PlaneMaps<C>& maps, int64_t p,
                        int64_t k) {
  const int64_t f = 4 * k, at = p * job.hw + f;
  const int n = job.hw - f < 4 ? (int)(job.hw - f) : 4;
  C x[4], m[4], z[4];
  load_quad(job.f1 + at, x, n, job.vec);
  load_quad(maps.a1 + f, m, n, job.vec);
  BF_UNROLL for (int q = 0; q < 4; ++q) z[q] = m[q] * x[q];
  if (job.f2) {
    load_quad(job.f2 + at, x, n, job.vec);
    load_quad(maps.a2 + f, m, n, job.vec);
    BF_UNROLL for (int q = 0; q < 4; ++q) z[q] += m[q] * x[q];
  }
  if (job.g.ptr || job.zb_out) {
    C e[4];
    if (job.zb)
      load_quad(job.zb + at, e, n, job.vec);
    else
      philox_normal4<C>(job.seed, job.offset + (uint64_t)at, e);
    if (job.g.ptr) {
      load_quad(maps.g + f, m, n, job.vec);
      BF_UNROLL for (int q = 0; q < 4; ++q) z[q] += m[q] * e[q];
    }
    if (job.zb_out) store_quad(job.zb_out + at, e, n, job.vec);
  }
  store_quad(job.f1 + at, z, n, job.vec);
}

}  // namespace blurfast
