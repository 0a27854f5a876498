// Function multiversioning of the CPU hot loops: each is compiled for AVX-512, AVX2 + FMA and the baseline,
// and the loader picks the best the CPU has (GCC on x86-64; elsewhere one portable build).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CSFRN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CSFRN_CPU_CLONES
#endif

// The loops a clone calls must be compiled inside it, not called from it as baseline code.
#if defined(__GNUC__)
#define CSFRN_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CSFRN_ALWAYS_INLINE inline
#endif
