// The fast kernels with __half I/O (cuda_fast_kernels.cuh).
#include "cuda_fast_kernels.cuh"

namespace blurfast {
namespace plane {

BLURFAST_PLANE_KERNELS(__half)
BLURFAST_STRIP_KERNELS(__half, float)
BLURFAST_STRIP_KERNELS(float, __half)
BLURFAST_SAME_LAYOUT_KERNELS(__half)

}  // namespace plane
}  // namespace blurfast
