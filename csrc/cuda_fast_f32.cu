// The fast kernels with float I/O (cuda_fast_kernels.cuh).
#include "cuda_fast_kernels.cuh"

namespace blurfast {
namespace plane {

BLURFAST_PLANE_KERNELS(float)
BLURFAST_STRIP_KERNELS(float, float)

}  // namespace plane
}  // namespace blurfast
