/* The CPU instructions fixedsim's hardware models are checked against.
 *
 * Built at run time with the system C compiler into a shared library and loaded with ctypes
 * (fixedsim.hardware.cpu). Each function is compiled for its own instruction set (target
 * attributes), so the library builds on any x86-64 compiler that knows the instructions; the
 * caller runs a function only when the CPU reports its feature.
 *
 * Every function computes independent rows: no instruction here is asked to do more than it
 * does in one place (one lane, one tile), so a result is the instruction's result.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* MXCSR: rounding control in bits 13-14 (0 nearest even, 1 down, 2 up, 3 toward zero),
 * FTZ bit 15, DAZ bit 6. */
static unsigned int set_mxcsr(int rc, int ftz, int daz) {
    unsigned int old = _mm_getcsr();
    unsigned int v = (old & ~((3u << 13) | (1u << 15) | (1u << 6))) | ((unsigned)rc << 13);
    if (ftz) v |= 1u << 15;
    if (daz) v |= 1u << 6;
    _mm_setcsr(v);
    return old;
}

/* VCVTPS2PH with the rounding in the immediate (mode 0 nearest even, 1 down, 2 up,
 * 3 toward zero), 8 values per instruction. */
__attribute__((target("f16c,avx")))
void fs_cvtps2ph(const float *x, uint16_t *out, int64_t n, int mode) {
    float buf[8];
    uint16_t res[8];
    for (int64_t i = 0; i < n; i += 8) {
        int64_t m = n - i < 8 ? n - i : 8;
        memset(buf, 0, sizeof buf);
        memcpy(buf, x + i, (size_t)m * sizeof(float));
        __m256 v = _mm256_loadu_ps(buf);
        __m128i h;
        switch (mode) {
        case 0: h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); break;
        case 1: h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEG_INF); break;
        case 2: h = _mm256_cvtps_ph(v, _MM_FROUND_TO_POS_INF); break;
        default: h = _mm256_cvtps_ph(v, _MM_FROUND_TO_ZERO); break;
        }
        _mm_storeu_si128((__m128i *)res, h);
        memcpy(out + i, res, (size_t)m * sizeof(uint16_t));
    }
}

/* D = C + A B as FMA chains: D[i, j] = vfmadd(A[i, K-1], B[K-1, j], ... vfmadd(A[i, 0],
 * B[0, j], C[i, j])) (scalar FMA3), A (M x K), B (K x N), C and D (M x N) row major, under
 * MXCSR rounding rc with FTZ / DAZ as asked. */
__attribute__((target("fma")))
void fs_fma32_gemm(const float *A, const float *B, const float *C, float *D, int64_t M,
                   int64_t N, int64_t K, int rc, int ftz, int daz) {
    unsigned int old = set_mxcsr(rc, ftz, daz);
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            __m128 acc = _mm_set_ss(C[i * N + j]);
            for (int64_t k = 0; k < K; k++)
                acc = _mm_fmadd_ss(_mm_set_ss(A[i * K + k]), _mm_set_ss(B[k * N + j]), acc);
            D[i * N + j] = _mm_cvtss_f32(acc);
        }
    _mm_setcsr(old);
}

__attribute__((target("fma")))
void fs_fma64_gemm(const double *A, const double *B, const double *C, double *D, int64_t M,
                   int64_t N, int64_t K, int rc, int ftz, int daz) {
    unsigned int old = set_mxcsr(rc, ftz, daz);
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            __m128d acc = _mm_set_sd(C[i * N + j]);
            for (int64_t k = 0; k < K; k++)
                acc = _mm_fmadd_sd(_mm_set_sd(A[i * K + k]), _mm_set_sd(B[k * N + j]), acc);
            D[i * N + j] = _mm_cvtsd_f64(acc);
        }
    _mm_setcsr(old);
}

/* D = C + A B by VDPBF16PS, A (M x K), B (K x N) BF16 row major (K even), C and D FP32:
 * one FP32 lane per output, 16 outputs of a row per instruction; for each pair
 * p = 0..K/2-1 the lane of D[i, j] holds (A[i, 2p], A[i, 2p+1]) and (B[2p, j], B[2p+1, j])
 * as its even (low) and odd (high) BF16 elements. The MXCSR state given is set around the
 * loop (the instruction is documented not to read it). */
__attribute__((target("avx512bf16,avx512f")))
void fs_dpbf16ps_gemm(const uint16_t *A, const uint16_t *B, const float *C, float *D,
                      int64_t M, int64_t N, int64_t K, int rc, int ftz, int daz) {
    unsigned int old = set_mxcsr(rc, ftz, daz);
    uint32_t pa[16], pb[16];
    float acc[16];
    for (int64_t i = 0; i < M; i++)
        for (int64_t j0 = 0; j0 < N; j0 += 16) {
            int64_t m = N - j0 < 16 ? N - j0 : 16;
            memset(acc, 0, sizeof acc);
            memcpy(acc, C + i * N + j0, (size_t)m * sizeof(float));
            __m512 v = _mm512_loadu_ps(acc);
            for (int64_t p = 0; p < K / 2; p++) {
                uint32_t ap = (uint32_t)A[i * K + 2 * p] | ((uint32_t)A[i * K + 2 * p + 1] << 16);
                for (int64_t l = 0; l < 16; l++) {
                    pa[l] = l < m ? ap : 0;
                    pb[l] = l < m ? ((uint32_t)B[2 * p * N + j0 + l]
                                     | ((uint32_t)B[(2 * p + 1) * N + j0 + l] << 16)) : 0;
                }
                v = _mm512_dpbf16_ps(v, (__m512bh)_mm512_loadu_si512(pa),
                                     (__m512bh)_mm512_loadu_si512(pb));
            }
            _mm512_storeu_ps(acc, v);
            memcpy(D + i * N + j0, acc, (size_t)m * sizeof(float));
        }
    _mm_setcsr(old);
}

/* AMX: ask the kernel for the tile data state (Linux). 0 on success. */
int fs_amx_request(void) {
#ifdef SYS_arch_prctl
    return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                        18 /* XFEATURE_XTILEDATA */);
#else
    return -1;
#endif
}

struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* D = C + A B by TDPBF16PS: A (M x K), B (K x N) BF16 row major, C, D (M x N) FP32,
 * M <= 16, N <= 16, K a multiple of 32: one instruction per 32 values of K, each adding
 * into the C tile the previous one left. B is packed in pairs of rows (VNNI layout). */
__attribute__((target("amx-tile,amx-bf16")))
void fs_tdpbf16ps(const uint16_t *A, const uint16_t *B, const float *C, float *D, int64_t M,
                  int64_t N, int64_t K) {
    struct tile_config cfg;
    uint16_t bt[16 * 32];
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = (uint8_t)M;
    cfg.colsb[0] = (uint16_t)(N * 4);
    cfg.rows[1] = (uint8_t)M;
    cfg.colsb[1] = 64;
    cfg.rows[2] = 16;
    cfg.colsb[2] = (uint16_t)(N * 4);
    _tile_loadconfig(&cfg);
    _tile_loadd(0, C, N * 4);
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        for (int64_t r = 0; r < 16; r++)
            for (int64_t j = 0; j < N; j++)
                for (int64_t e = 0; e < 2; e++)
                    bt[(r * N + j) * 2 + e] = B[(k0 + 2 * r + e) * N + j];
        _tile_loadd(1, A + k0, K * 2);
        _tile_loadd(2, bt, N * 4);
        _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, D, N * 4);
    _tile_release();
}
