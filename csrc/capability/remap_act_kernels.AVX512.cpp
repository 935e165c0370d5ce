// Compiled with the AVX512 instruction-set flags and CPU_CAPABILITY=AVX512 by setup.py.
#include "../remap_act_kernels.cpp"
