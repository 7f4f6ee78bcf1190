// The CPU kernels of one capability: CMakeLists.txt compiles this file once per CPU
// capability, with that capability's compiler flags, CPU_CAPABILITY=<NAME> and
// CPU_CAPABILITY_<NAME> defined (as ATen builds its native/cpu/ kernels), so that
// at::vec::Vectorized is that capability's and everything here lands in
// growdense::cpu::<NAME>. capability.cpp picks one table at run time.
#ifndef CPU_CAPABILITY
#error "csrc/cpu/vec/kernels.cpp is compiled once per CPU capability by CMakeLists.txt, with CPU_CAPABILITY set"
#endif

#include "cpu/capability.h"
#include "cpu/vec/adam_kernel.h"
#include "cpu/vec/elbo_kernel.h"
#include "cpu/vec/epilogue_kernel.h"
#include "cpu/vec/normal_kernel.h"

namespace growdense::cpu {
inline namespace CPU_CAPABILITY {

const KernelTable& kernel_table() {
  static const KernelTable table{&elbo_forward, &elbo_backward, &bias_activation, &activation_backward,
                                     &adam_block, &normal_fill};
  return table;
}

}  // namespace CPU_CAPABILITY
}  // namespace growdense::cpu
