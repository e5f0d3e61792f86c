// The fast kernels with __nv_bfloat16 I/O (cuda_fast_kernels.cuh).
#include "cuda_fast_kernels.cuh"

namespace blurfast {
namespace plane {

BLURFAST_PLANE_KERNELS(__nv_bfloat16)
BLURFAST_STRIP_KERNELS(__nv_bfloat16, float)
BLURFAST_STRIP_KERNELS(float, __nv_bfloat16)
BLURFAST_SAME_LAYOUT_KERNELS(__nv_bfloat16)

}  // namespace plane
}  // namespace blurfast
