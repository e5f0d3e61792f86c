// The fast kernels with float I/O (cuda_fast_kernels.cuh).
#include "cuda_fast_kernels.cuh"

namespace blurfast {
namespace plane {

BLURFAST_PLANE_KERNELS(float)
// fast+occ (on trial): float I/O only, as the bench times it.
template struct PlaneKernel<Capped<Geom<64, 2, true>, 4>, float>;
BLURFAST_STRIP_KERNELS(float, float)

}  // namespace plane
}  // namespace blurfast
