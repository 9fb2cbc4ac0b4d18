// cuda_runtime.h for the emulated backend: everything a kernel needs from it
// is already in cuda_shim.h, which the build force-includes.
#pragma once
