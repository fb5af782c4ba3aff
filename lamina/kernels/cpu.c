/* What the CPU and the OS let lamina's kernels (and oneDNN's bfloat16 GEMM) use, read with cpuid and xgetbv. Built for the baseline of the
 * architecture (no -m flags) into its own library, so asking never runs an instruction the CPU may lack. */
#include <stdint.h>

enum {
    LAMINA_CPU_AVX2 = 1,        /* AVX2 + FMA + F16C, and the OS saves the 256-bit registers */
    LAMINA_CPU_AVX512 = 2,      /* AVX-512 F/BW/VL/DQ + VNNI, and the OS saves the 512-bit and mask registers */
    LAMINA_CPU_AVX512_BF16 = 4, /* AVX-512 BF16 (vdpbf16ps), with the above */
    LAMINA_CPU_AMX_BF16 = 8,    /* AMX tiles with BF16, the OS has tile state in XCR0, and granted it to this
                                 * process (asked here: oneDNN asks again before its own tile code) */
    LAMINA_CPU_AMX_INT8 = 16,
};

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* Linux gives a process AMX's tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
 * a tile instruction before that is SIGILL. Asking is harmless and lasts for the process. */
static int amx_permitted(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

int lamina_cpu_features(void) {
    uint32_t a, b, c, d, b7 = 0, c7 = 0, d7 = 0, a71 = 0, max = __get_cpuid_max(0, 0);
    if (max < 1 || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return 0;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return 0; /* the OS does not save xmm/ymm state */
    if (max >= 7) {
        __cpuid_count(7, 0, a, b7, c7, d7);
        __cpuid_count(7, 1, a71, b, c, d);
    }
    int features = 0;
    if (((b7 >> 5) & 1) && fma && f16c) features |= LAMINA_CPU_AVX2;
    const int avx512 = ((b7 >> 16) & 1) && ((b7 >> 17) & 1) && ((b7 >> 30) & 1) && ((b7 >> 31) & 1) && ((c7 >> 11) & 1);
    if ((features & LAMINA_CPU_AVX2) && avx512 && (xcr0 & 0xe0) == 0xe0) {
        features |= LAMINA_CPU_AVX512;
        if ((a71 >> 5) & 1) features |= LAMINA_CPU_AVX512_BF16;
    }
    if (((d7 >> 24) & 1) && (xcr0 & 0x60000) == 0x60000 && amx_permitted()) {
        if ((d7 >> 22) & 1) features |= LAMINA_CPU_AMX_BF16;
        if ((d7 >> 25) & 1) features |= LAMINA_CPU_AMX_INT8;
    }
    return features;
}
#else
int lamina_cpu_features(void) { return 0; }
#endif
