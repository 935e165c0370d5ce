// Compiled with the DEFAULT instruction-set flags and CPU_CAPABILITY=DEFAULT by setup.py.
#include "../remap_act_kernels.cpp"
