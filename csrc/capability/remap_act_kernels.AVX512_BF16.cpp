// Compiled with the AVX512 and AVX512-BF16 instruction-set flags, CPU_CAPABILITY=AVX512_BF16 and
// CPU_CAPABILITY_AVX512 (for at::vec's AVX-512 Vectorized) by setup.py.
#include "../remap_act_kernels.cpp"
