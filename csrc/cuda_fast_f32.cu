// The fast kernels with float I/O (cuda_fast_kernels.cuh).
#include "cuda_fast_kernels.cuh"

namespace blurfast {
namespace plane {

BLURFAST_PLANE_KERNELS(float)
BLURFAST_STRIP_KERNELS(float, float)
BLURFAST_SAME_LAYOUT_KERNELS(float)
// The column pass works in float whatever the call's I/O type.
template struct ColumnKernel<32>;
template struct ColumnKernel<64>;
template struct ColumnKernel<128>;
template struct ColumnKernel<256>;

}  // namespace plane
}  // namespace blurfast
