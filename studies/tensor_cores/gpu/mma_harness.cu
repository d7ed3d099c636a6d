// One warp per 16 x 8 tile: D = C + A B through a chain of mma.sync instructions, each on
// the next KI columns of A (rows of B), the D of one instruction the C of the next.
//
//   mma_harness COMBO TILES NK IN OUT
//
// COMBO names the instruction (see kCombos). IN holds, for TILES tiles, A as (16, NK*KI)
// row-major, then B as (8, NK*KI) (each column of B contiguous), then C as (16, 8), all as
// bit patterns of their formats (1, 2 or 4 bytes; C is FP32 or FP16); OUT receives D as
// (TILES, 16, 8) in the output format. Fragment layouts: PTX ISA, "Matrix fragments for
// mma.m16n8k*": lane = 4 g + t; A register r holds E = 4 / bytes consecutive columns
// t E + (r >> 1) KI / 2 .. of row g + 8 (r & 1); B register r the rows t E + r KI / 2 ..
// of column g; C and D element i is (g + 8 (i >> 1), 2 t + (i & 1)).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); exit(2); } } while (0)

enum Op { F16_F32, F16_F16, BF16_F32, TF32_F32, E4M3_F32, E5M2_F32, E4M3_F16, E5M2_F16 };

template <Op OP> struct Traits;
template <> struct Traits<F16_F32>  { static const int BYTES = 2, KI = 16; static const bool H = false; };
template <> struct Traits<F16_F16>  { static const int BYTES = 2, KI = 16; static const bool H = true; };
template <> struct Traits<BF16_F32> { static const int BYTES = 2, KI = 16; static const bool H = false; };
template <> struct Traits<TF32_F32> { static const int BYTES = 4, KI = 8;  static const bool H = false; };
template <> struct Traits<E4M3_F32> { static const int BYTES = 1, KI = 32; static const bool H = false; };
template <> struct Traits<E5M2_F32> { static const int BYTES = 1, KI = 32; static const bool H = false; };
template <> struct Traits<E4M3_F16> { static const int BYTES = 1, KI = 32; static const bool H = true; };
template <> struct Traits<E5M2_F16> { static const int BYTES = 1, KI = 32; static const bool H = true; };

// d[0..3] (FP32) or d[0..1] (two FP16 each) <- mma(a, b, d)
template <Op OP> __device__ __forceinline__ void mma(uint32_t* d, const uint32_t* a, const uint32_t* b);

#define MMA_F32(OPNAME, SHAPE, TYPES)                                                        \
  template <> __device__ __forceinline__ void mma<OPNAME>(uint32_t* d, const uint32_t* a,    \
                                                          const uint32_t* b) {               \
    asm volatile("mma.sync.aligned." SHAPE ".row.col.f32." TYPES ".f32 "                     \
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                   \
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])                            \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));        \
  }
#define MMA_F16(OPNAME, SHAPE, TYPES)                                                        \
  template <> __device__ __forceinline__ void mma<OPNAME>(uint32_t* d, const uint32_t* a,    \
                                                          const uint32_t* b) {               \
    asm volatile("mma.sync.aligned." SHAPE ".row.col.f16." TYPES ".f16 "                     \
                 "{%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%0,%1};\n"                               \
                 : "+r"(d[0]), "+r"(d[1])                                                    \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));        \
  }
MMA_F32(F16_F32, "m16n8k16", "f16.f16")
MMA_F16(F16_F16, "m16n8k16", "f16.f16")
MMA_F32(BF16_F32, "m16n8k16", "bf16.bf16")
MMA_F32(TF32_F32, "m16n8k8", "tf32.tf32")
MMA_F32(E4M3_F32, "m16n8k32", "e4m3.e4m3")
MMA_F32(E5M2_F32, "m16n8k32", "e5m2.e5m2")
MMA_F16(E4M3_F16, "m16n8k32", "e4m3.e4m3")
MMA_F16(E5M2_F16, "m16n8k32", "e5m2.e5m2")

template <Op OP>
__global__ void tiles(const uint8_t* A, const uint8_t* B, const uint8_t* C, uint8_t* D,
                      int ntiles, int nk) {
  typedef Traits<OP> T;
  const int E = 4 / T::BYTES, K = nk * T::KI;
  const int tile = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (tile >= ntiles) return;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint8_t* a = A + (size_t)tile * 16 * K * T::BYTES;
  const uint8_t* b = B + (size_t)tile * 8 * K * T::BYTES;
  const int cb = T::H ? 2 : 4;  // bytes of a C or D element
  const uint8_t* c = C + (size_t)tile * 128 * cb;
  uint8_t* d = D + (size_t)tile * 128 * cb;
  uint32_t acc[4];
  for (int i = 0; i < (T::H ? 2 : 4); ++i) {
    // FP32: element i; FP16: the pair (2 i, 2 i + 1), same row, adjacent columns
    int row = T::H ? g + 8 * i : g + 8 * (i >> 1), col = T::H ? 2 * t : 2 * t + (i & 1);
    memcpy(&acc[i], c + (row * 8 + col) * cb, 4);
  }
  for (int s = 0; s < nk; ++s) {
    const int k0 = s * T::KI;
    uint32_t ra[4], rb[2];
    for (int r = 0; r < 4; ++r) {
      int row = g + 8 * (r & 1), col = k0 + t * E + (r >> 1) * (T::KI / 2);
      memcpy(&ra[r], a + ((size_t)row * K + col) * T::BYTES, 4);
    }
    for (int r = 0; r < 2; ++r) {
      int row = k0 + t * E + r * (T::KI / 2);
      memcpy(&rb[r], b + ((size_t)g * K + row) * T::BYTES, 4);
    }
    mma<OP>(acc, ra, rb);
  }
  for (int i = 0; i < (T::H ? 2 : 4); ++i) {
    int row = T::H ? g + 8 * i : g + 8 * (i >> 1), col = T::H ? 2 * t : 2 * t + (i & 1);
    memcpy(d + (row * 8 + col) * cb, &acc[i], 4);
  }
}

struct Combo { const char* name; Op op; int bytes, ki; bool h; };
static const Combo kCombos[] = {
  {"fp16_fp32", F16_F32, 2, 16, false}, {"fp16_fp16", F16_F16, 2, 16, true},
  {"bf16_fp32", BF16_F32, 2, 16, false}, {"tf32_fp32", TF32_F32, 4, 8, false},
  {"e4m3_fp32", E4M3_F32, 1, 32, false}, {"e5m2_fp32", E5M2_F32, 1, 32, false},
  {"e4m3_fp16", E4M3_F16, 1, 32, true}, {"e5m2_fp16", E5M2_F16, 1, 32, true},
};

template <Op OP>
static void launch(const uint8_t* A, const uint8_t* B, const uint8_t* C, uint8_t* D, int n, int nk) {
  const int warps = 4;
  tiles<OP><<<(n + warps - 1) / warps, 32 * warps>>>(A, B, C, D, n, nk);
}

int main(int argc, char** argv) {
  if (argc != 6) { fprintf(stderr, "usage: %s COMBO TILES NK IN OUT\n", argv[0]); return 1; }
  const Combo* cm = nullptr;
  for (const Combo& x : kCombos) if (!strcmp(x.name, argv[1])) cm = &x;
  if (!cm) { fprintf(stderr, "unknown combo %s\n", argv[1]); return 1; }
  const int n = atoi(argv[2]), nk = atoi(argv[3]);
  const size_t K = (size_t)nk * cm->ki, cb = cm->h ? 2 : 4;
  const size_t na = (size_t)n * 16 * K * cm->bytes, nb = (size_t)n * 8 * K * cm->bytes,
               nc = (size_t)n * 128 * cb;
  std::vector<uint8_t> host(na + nb + nc), out(nc);
  FILE* f = fopen(argv[4], "rb");
  if (!f || fread(host.data(), 1, host.size(), f) != host.size()) {
    fprintf(stderr, "%s: expected %zu bytes\n", argv[4], host.size()); return 1; }
  fclose(f);
  uint8_t *dA, *dD;
  CHECK(cudaMalloc(&dA, host.size()));
  CHECK(cudaMalloc(&dD, nc));
  CHECK(cudaMemcpy(dA, host.data(), host.size(), cudaMemcpyHostToDevice));
  const uint8_t *dB = dA + na, *dC = dA + na + nb;
  switch (cm->op) {
    case F16_F32: launch<F16_F32>(dA, dB, dC, dD, n, nk); break;
    case F16_F16: launch<F16_F16>(dA, dB, dC, dD, n, nk); break;
    case BF16_F32: launch<BF16_F32>(dA, dB, dC, dD, n, nk); break;
    case TF32_F32: launch<TF32_F32>(dA, dB, dC, dD, n, nk); break;
    case E4M3_F32: launch<E4M3_F32>(dA, dB, dC, dD, n, nk); break;
    case E5M2_F32: launch<E5M2_F32>(dA, dB, dC, dD, n, nk); break;
    case E4M3_F16: launch<E4M3_F16>(dA, dB, dC, dD, n, nk); break;
    case E5M2_F16: launch<E5M2_F16>(dA, dB, dC, dD, n, nk); break;
  }
  CHECK(cudaGetLastError());
  CHECK(cudaMemcpy(out.data(), dD, nc, cudaMemcpyDeviceToHost));
  f = fopen(argv[5], "wb");
  if (!f || fwrite(out.data(), 1, nc, f) != nc) { fprintf(stderr, "cannot write %s\n", argv[5]); return 1; }
  fclose(f);
  printf("%s: %d tiles x %d instructions\n", cm->name, n, nk);
  return 0;
}
