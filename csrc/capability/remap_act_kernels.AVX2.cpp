// Compiled with the AVX2 instruction-set flags and CPU_CAPABILITY=AVX2 by setup.py.
#include "../remap_act_kernels.cpp"
