/* loraswap's CPU kernels, for x86 CPUs with AVX512-BF16: 4-bit x float matrix products on bitsandbytes'
   CPU-packed weights (q4_matmul_*), a float x bf16-weight product for the LM head (bf16w_matmul), and the LoRA
   deltas of a batch whose rows use different adapters (lora_add, AVX512F only).

   bitsandbytes' own CPU kernel is a GEMV per row: a step of 16 rows dequantizes every weight 16 times. Here
   each tile of 32 output features x one pair of input features is dequantized once, into registers, and used
   for up to MAX_ROWS rows; a batch of 16 rows dequantizes each weight twice.

   Weight layout (`bitsandbytes.functional._convert_weight_packed_for_cpu`, block_n 32): [n/32][k/2][32]
   bytes. In each 32 bytes, byte 2j+p holds input feature 2i+p (i the pair, p 0 or 1) of output feature j of
   the block in its low nibble and of output feature j+16 in its high nibble. absmax is [k/blocksize][n] bf16
   (one scale per output feature and block of inputs), code the 16 values of the data type (NF4 or FP4).

   Three variants, for CPUs whose strengths differ (the server measures them at start-up):
   - q4_matmul_f32: weights dequantized to float32, float32 FMAs (a 2-core Xeon issues two 16-lane FMAs a
     cycle but one vdpbf16ps every two cycles);
   - q4_matmul_bf16: weights as bf16, vdpbf16ps on the input rounded to bf16 (as bitsandbytes computes), for
     CPUs where the bf16 dot product is the faster one (AMD Zen 4);
   - q4_matmul_i8: weights as int8, the input as int8 blocks with a scale each, integer dot products (VNNI),
     as llama.cpp computes its quantized layers (below).
   All write float32. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK_N 32
#define MAX_ROWS 8

static inline __m512 scales(const uint16_t *s) { /* 16 bf16 -> float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)s)), 16));
}

static inline __m512 load_tail(const float *p, int64_t left) {
    return left >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps((__mmask16)((1u << left) - 1), p);
}

/* A tile's running sums (acc[ROWS][2]: outputs 0-15 and 16-31 of each row) into out. */
#define STORE_TILE(ROWS)                                                                                      \
    for (int r = 0; r < ROWS; r++) {                                                                          \
        _mm512_storeu_ps(out + r * ldo, acc[r][0]);                                                           \
        _mm512_storeu_ps(out + r * ldo + 16, acc[r][1]);                                                      \
    }

/* The 32 outputs of one packed block for ROWS rows: per block of inputs, partial sums in registers (PAIR adds
   one pair of inputs to them), then scaled by that block's absmax into the running sums. */
#define Q4_TILE(NAME, ROWS, A_T, LUT_T, PAIR)                                                                  \
    static void NAME##_##ROWS(const A_T *a, int64_t lda, const uint8_t *w, const uint16_t *absmax, int64_t n,  \
                              int64_t k, int64_t blocksize, LUT_T lut, float *out, int64_t ldo) {             \
        __m512 acc[ROWS][2];                                                                                  \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                           \
        const int64_t pairs = blocksize / 2;                                                                  \
        for (int64_t kb = 0; kb < k / blocksize; kb++) {                                                      \
            __m512 part[ROWS][2];                                                                             \
            for (int r = 0; r < ROWS; r++) part[r][0] = part[r][1] = _mm512_setzero_ps();                     \
            const uint8_t *wp = w + kb * pairs * BLOCK_N;                                                     \
            const A_T *ap = a + kb * blocksize;                                                               \
            for (int64_t p = 0; p < pairs; p++) {                                                             \
                PAIR(ROWS)                                                                                    \
            }                                                                                                 \
            const __m512 s0 = scales(absmax + kb * n), s1 = scales(absmax + kb * n + 16);                     \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                acc[r][0] = _mm512_fmadd_ps(part[r][0], s0, acc[r][0]);                                       \
                acc[r][1] = _mm512_fmadd_ps(part[r][1], s1, acc[r][1]);                                       \
            }                                                                                                 \
        }                                                                                                     \
        STORE_TILE(ROWS)                                                                                      \
    }

/* float32: 16 lanes, one per output feature j: bits 0-3 hold input 2p of j, 4-7 of j+16, 8-15 the same for
   input 2p+1; vpermps reads the low 4 bits of each lane. */
#define PAIR_F32(ROWS)                                                                                        \
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wp + p * BLOCK_N)));               \
    __m512 even_lo = _mm512_permutexvar_ps(x, lut);                                                           \
    __m512 even_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), lut);                                     \
    __m512 odd_lo = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 8), lut);                                      \
    __m512 odd_hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 12), lut);                                     \
    for (int r = 0; r < ROWS; r++) {                                                                          \
        __m512 x0 = _mm512_set1_ps(ap[r * lda + 2 * p]);                                                      \
        __m512 x1 = _mm512_set1_ps(ap[r * lda + 2 * p + 1]);                                                  \
        part[r][0] = _mm512_fmadd_ps(x0, even_lo, part[r][0]);                                                \
        part[r][1] = _mm512_fmadd_ps(x0, even_hi, part[r][1]);                                                \
        part[r][0] = _mm512_fmadd_ps(x1, odd_lo, part[r][0]);                                                 \
        part[r][1] = _mm512_fmadd_ps(x1, odd_hi, part[r][1]);                                                 \
    }

/* bf16: word 2j+q holds input 2p+q of output j (low nibble) and of j+16 (high): the pairs vdpbf16ps takes. */
#define PAIR_BF16(ROWS)                                                                                       \
    __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wp + p * BLOCK_N)));            \
    __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(15)), lut);    \
    __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lut);                       \
    for (int r = 0; r < ROWS; r++) {                                                                          \
        __m512bh x = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(ap + r * lda + 2 * p));                   \
        part[r][0] = _mm512_dpbf16_ps(part[r][0], x, lo);                                                     \
        part[r][1] = _mm512_dpbf16_ps(part[r][1], x, hi);                                                     \
    }

#define TILE_F32(ROWS) Q4_TILE(tile_f32, ROWS, float, __m512, PAIR_F32)
#define TILE_BF16(ROWS) Q4_TILE(tile_bf16, ROWS, uint16_t, __m512i, PAIR_BF16)

TILE_F32(1) TILE_F32(2) TILE_F32(3) TILE_F32(4) TILE_F32(5) TILE_F32(6) TILE_F32(7) TILE_F32(8)
TILE_BF16(1) TILE_BF16(2) TILE_BF16(3) TILE_BF16(4) TILE_BF16(5) TILE_BF16(6) TILE_BF16(7) TILE_BF16(8)

typedef void (*tile_f32_fn)(const float *, int64_t, const uint8_t *, const uint16_t *, int64_t, int64_t, int64_t,
                            __m512, float *, int64_t);
typedef void (*tile_bf16_fn)(const uint16_t *, int64_t, const uint8_t *, const uint16_t *, int64_t, int64_t,
                             int64_t, __m512i, float *, int64_t);
static const tile_f32_fn TILES_F32[MAX_ROWS + 1] = {0, tile_f32_1, tile_f32_2, tile_f32_3, tile_f32_4,
                                                    tile_f32_5, tile_f32_6, tile_f32_7, tile_f32_8};
static const tile_bf16_fn TILES_BF16[MAX_ROWS + 1] = {0, tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4,
                                                      tile_bf16_5, tile_bf16_6, tile_bf16_7, tile_bf16_8};

static int bad_shape(int64_t m, int64_t n, int64_t k, int64_t blocksize) {
    return m < 0 || n <= 0 || n % BLOCK_N || blocksize <= 0 || blocksize % 2 || k % blocksize;
}

/* Every packed block of outputs on the threads, each block's rows in tiles of up to MAX_ROWS. */
#define RUN_TILES(TILES)                                                                                      \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                                          \
    for (int64_t b = 0; b < n / BLOCK_N; b++)                                                                  \
        for (int64_t r = 0; r < m; r += MAX_ROWS)                                                              \
            TILES[m - r < MAX_ROWS ? m - r : MAX_ROWS](a + r * lda, lda, w + b * (k / 2) * BLOCK_N,            \
                                                       absmax + b * BLOCK_N, n, k, blocksize, lut,             \
                                                       out + r * ldo + b * BLOCK_N, ldo);

/* out[m][n] (row stride ldo) = a[m][k] (float32, row stride lda) x dequantized w^T, on `threads` OpenMP
   threads (the caller's torch.get_num_threads()). Returns 0, or -1 for a shape the layout cannot hold. */
int q4_matmul_f32(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const uint8_t *w,
                  const uint16_t *absmax, int64_t blocksize, const float *code, float *out, int64_t ldo,
                  int threads) {
    if (bad_shape(m, n, k, blocksize)) return -1;
    const __m512 lut = _mm512_loadu_ps(code);
    RUN_TILES(TILES_F32)
    return 0;
}

/* The same with a (and the 16 code values) in bf16. */
int q4_matmul_bf16(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t lda, const uint8_t *w,
                   const uint16_t *absmax, int64_t blocksize, const uint16_t *code, float *out, int64_t ldo,
                   int threads) {
    if (bad_shape(m, n, k, blocksize)) return -1;
    uint16_t table[32] = {0};
    for (int i = 0; i < 16; i++) table[i] = code[i];
    const __m512i lut = _mm512_loadu_si512(table);
    RUN_TILES(TILES_BF16)
    return 0;
}

/* 4-bit weights x int8 activations, integer dot products (AVX512-VNNI vpdpbusd: 4 multiply-adds per
   32-bit lane, where vdpbf16ps does 2 and a float32 FMA 1), as llama.cpp computes its quantized layers.
   - Activations: each row's block of `blocksize` inputs (the weight's absmax block) as int8 with its own scale
     (absmax / 127, round to nearest), and the block's sum of those int8 values.
   - Weights: each 4-bit code as an unsigned byte, 128 + round(code * 127 / max|code|) (the code table's values
     to 1/254 of its range), looked up 64 at a time with vpshufb.
   vpdpbusd multiplies unsigned bytes by signed ones: sum((128 + w) * a) = sum(w * a) + 128 * sum(a), so each
   block's integer sum less 128 times the activations' block sum is exact; it is scaled by the activation
   block's scale and the weight's absmax into float32 sums. Four inputs of one output feature are the four
   bytes of one 32-bit lane: in the packed layout pair p of 32 outputs is 32 bytes (a 16-bit word per output
   j holding its two inputs, j in the low nibbles and j+16 in the high ones), so two pairs' words widened and
   joined make 16 lanes of four inputs for outputs j and j+16. */
#define TILE_I8(ROWS)                                                                                         \
    static void tile_i8_##ROWS(const int8_t *a, int64_t lda, const float *ascale, const int32_t *asum,        \
                               int64_t nblocks, const uint8_t *w, const uint16_t *absmax, int64_t n,          \
                               int64_t blocksize, __m512i lut, float wscale, float *out, int64_t ldo) {       \
        __m512 acc[ROWS][2];                                                                                  \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                           \
        const __m512i low4 = _mm512_set1_epi8(15);                                                            \
        const int64_t quads = blocksize / 4;                                                                  \
        for (int64_t kb = 0; kb < nblocks; kb++) {                                                            \
            __m512i part[ROWS][2];                                                                            \
            for (int r = 0; r < ROWS; r++) part[r][0] = part[r][1] = _mm512_setzero_si512();                  \
            const uint8_t *wp = w + kb * (blocksize / 2) * BLOCK_N;                                           \
            const int8_t *ap = a + kb * blocksize;                                                            \
            for (int64_t q = 0; q < quads; q++) {                                                             \
                const __m512i x = _mm512_or_si512(                                                            \
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wp + 2 * q * BLOCK_N))),       \
                    _mm512_slli_epi32(                                                                        \
                        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(wp + (2 * q + 1) * BLOCK_N))), \
                        16));                                                                                 \
                const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(x, low4));                       \
                const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(x, 4), low4)); \
                for (int r = 0; r < ROWS; r++) {                                                              \
                    const __m512i xa = _mm512_set1_epi32(*(const int32_t *)(ap + r * lda + 4 * q));           \
                    part[r][0] = _mm512_dpbusd_epi32(part[r][0], lo, xa);                                     \
                    part[r][1] = _mm512_dpbusd_epi32(part[r][1], hi, xa);                                     \
                }                                                                                             \
            }                                                                                                 \
            const __m512 s0 = _mm512_mul_ps(scales(absmax + kb * n), _mm512_set1_ps(wscale));                 \
            const __m512 s1 = _mm512_mul_ps(scales(absmax + kb * n + 16), _mm512_set1_ps(wscale));            \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                const __m512i bias = _mm512_set1_epi32(128 * asum[r * nblocks + kb]);                         \
                const __m512 sa = _mm512_set1_ps(ascale[r * nblocks + kb]);                                   \
                acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(part[r][0], bias)),            \
                                            _mm512_mul_ps(s0, sa), acc[r][0]);                                \
                acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(part[r][1], bias)),            \
                                            _mm512_mul_ps(s1, sa), acc[r][1]);                                \
            }                                                                                                 \
        }                                                                                                     \
        STORE_TILE(ROWS)                                                                                      \
    }

TILE_I8(1) TILE_I8(2) TILE_I8(3) TILE_I8(4) TILE_I8(5) TILE_I8(6) TILE_I8(7) TILE_I8(8)

typedef void (*tile_i8_fn)(const int8_t *, int64_t, const float *, const int32_t *, int64_t, const uint8_t *,
                           const uint16_t *, int64_t, int64_t, __m512i, float, float *, int64_t);
static const tile_i8_fn TILES_I8[MAX_ROWS + 1] = {0, tile_i8_1, tile_i8_2, tile_i8_3, tile_i8_4,
                                                tile_i8_5, tile_i8_6, tile_i8_7, tile_i8_8};

/* Row r of a (float32, k inputs) as int8 blocks of `blocksize` into q (k bytes a row), with each block's scale
   and sum of int8 values into ascale and asum ([m][k/blocksize]). */
static void quantize_rows(int64_t m, int64_t k, const float *a, int64_t lda, int64_t blocksize, int8_t *q,
                          float *ascale, int32_t *asum, int threads) {
    const int64_t nblocks = k / blocksize;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < m; r++)
        for (int64_t kb = 0; kb < nblocks; kb++) {
            const float *x = a + r * lda + kb * blocksize;
            int8_t *out = q + r * k + kb * blocksize;
            __m512 vmax = _mm512_setzero_ps();
            for (int64_t i = 0; i < blocksize; i += 16)
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load_tail(x + i, blocksize - i)));
            const float amax = _mm512_reduce_max_ps(vmax);
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i sum = _mm512_setzero_si512();
            for (int64_t i = 0; i < blocksize; i += 16) {
                const int64_t left = blocksize - i;
                const __mmask16 keep = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                const __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load_tail(x + i, left), inv),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                sum = _mm512_mask_add_epi32(sum, keep, sum, v);
                _mm512_mask_cvtepi32_storeu_epi8(out + i, keep, v);
            }
            ascale[r * nblocks + kb] = amax / 127.0f;
            asum[r * nblocks + kb] = _mm512_reduce_add_epi32(sum);
        }
}

/* out[m][n] (row stride ldo) = a[m][k] (float32, row stride lda) x dequantized w^T through int8 activations;
   code is the 16 float32 values of the data type. The int8 rows, their scales and sums are scratch allocated
   here, one block per call. Returns 0, -1 for a shape the layout cannot hold (blocksize must be a multiple of
   4), or -2 where the scratch cannot be allocated. */
int q4_matmul_i8(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const uint8_t *w,
                 const uint16_t *absmax, int64_t blocksize, const float *code, float *out, int64_t ldo,
                 int threads) {
    if (bad_shape(m, n, k, blocksize) || blocksize % 4) return -1;
    if (m == 0) return 0;
    float cmax = 0.0f;
    for (int i = 0; i < 16; i++) cmax = fmaxf(cmax, fabsf(code[i]));
    if (cmax == 0.0f) cmax = 1.0f;
    uint8_t table[16];
    for (int i = 0; i < 16; i++) table[i] = (uint8_t)(128 + lrintf(code[i] * 127.0f / cmax));
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)table));
    const float wscale = cmax / 127.0f;
    const int64_t nblocks = k / blocksize;
    float *ascale = malloc((size_t)(m * nblocks) * (sizeof(float) + sizeof(int32_t)) + (size_t)(m * k));
    if (ascale == NULL) return -2;
    int32_t *asum = (int32_t *)(ascale + m * nblocks);
    int8_t *q = (int8_t *)(asum + m * nblocks);
    quantize_rows(m, k, a, lda, blocksize, q, ascale, asum, threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < n / BLOCK_N; b++)
        for (int64_t r = 0; r < m; r += MAX_ROWS)
            TILES_I8[m - r < MAX_ROWS ? m - r : MAX_ROWS](q + r * k, k, ascale + r * nblocks, asum + r * nblocks,
                                                         nblocks, w + b * (k / 2) * BLOCK_N,
                                                         absmax + b * BLOCK_N, n, blocksize, lut, wscale,
                                                         out + r * ldo + b * BLOCK_N, ldo);
    free(ascale);
    return 0;
}

/* out[m][n] (row stride ldo) = a[m][k] (float32, row stride lda) x w^T for a weight held in bf16, in float32
   FMAs: an LM head kept as bf16 reads half the memory of a float32 one, and on a CPU whose bf16 dot product
   is slow this beats a bf16 matmul. w is [n/32][k][32] (`q4.pack_bf16`): 32 output features side by side
   for each input feature; a tile is those 32 outputs for up to MAX_ROWS rows. */
static inline __m512 bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#define TILE_BF16W(ROWS)                                                                                      \
    static void tile_bf16w_##ROWS(const float *a, int64_t lda, const uint16_t *w, int64_t k, float *out,      \
                                  int64_t ldo) {                                                              \
        __m512 acc[ROWS][2];                                                                                  \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();                           \
        for (int64_t i = 0; i < k; i++) {                                                                     \
            const __m512 w0 = bf16x16(w + i * 32), w1 = bf16x16(w + i * 32 + 16);                            \
            for (int r = 0; r < ROWS; r++) {                                                                  \
                const __m512 x = _mm512_set1_ps(a[r * lda + i]);                                              \
                acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);                                                \
                acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);                                                \
            }                                                                                                 \
        }                                                                                                     \
        STORE_TILE(ROWS)                                                                                      \
    }

TILE_BF16W(1) TILE_BF16W(2) TILE_BF16W(3) TILE_BF16W(4) TILE_BF16W(5) TILE_BF16W(6) TILE_BF16W(7) TILE_BF16W(8)

typedef void (*tile_bf16w_fn)(const float *, int64_t, const uint16_t *, int64_t, float *, int64_t);
static const tile_bf16w_fn TILES_BF16W[MAX_ROWS + 1] = {0, tile_bf16w_1, tile_bf16w_2, tile_bf16w_3, tile_bf16w_4,
                                                        tile_bf16w_5, tile_bf16w_6, tile_bf16w_7, tile_bf16w_8};

int bf16w_matmul(int64_t m, int64_t n, int64_t k, const float *a, int64_t lda, const uint16_t *w, float *out,
                 int64_t ldo, int threads) {
    if (m < 0 || n <= 0 || n % BLOCK_N || k <= 0) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < n / BLOCK_N; b++)
        for (int64_t r = 0; r < m; r += MAX_ROWS)
            TILES_BF16W[m - r < MAX_ROWS ? m - r : MAX_ROWS](a + r * lda, lda, w + b * k * BLOCK_N, k,
                                                             out + r * ldo + b * BLOCK_N, ldo);
    return 0;
}

/* out[r] += scale[s] * (x[r] A[s]^T) Bt[s] for every row r of a LoRA layer, s = slot[r / per] (a batch of
   sequences of `per` rows each, one adapter a sequence); slot 0, the zero adapter, is skipped. A is [S][rank][k],
   Bt (B transposed) [S][rank][n], scale [S], all float32 and contiguous. Rows are independent: no gathered copy of
   any adapter's weights, whatever the mix, and the rank-sized intermediate stays in registers. AVX512F only. */
#define LORA_MAX_RANK 128


int lora_add(int64_t m, int64_t n, int64_t k, int64_t rank, const float *x, int64_t ldx, const float *A,
             const float *Bt, const float *scale, const int64_t *slot, int64_t per, float *out, int64_t ldo,
             int threads) {
    if (m < 0 || n <= 0 || k <= 0 || rank <= 0 || rank > LORA_MAX_RANK || per <= 0) return -1;
    const int parallel = threads > 1 && m * rank * (n + k) >= (1 << 18);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < m; r++) {
        const int64_t s = slot[r / per];
        if (s == 0 || scale[s] == 0.0f) continue;
        const float *xr = x + r * ldx, *a = A + s * rank * k, *bt = Bt + s * rank * n;
        float u[LORA_MAX_RANK];
        for (int64_t q0 = 0; q0 < rank; q0 += 8) { /* 8 independent sums at a time: x read once for them */
            const int64_t qn = rank - q0 < 8 ? rank - q0 : 8;
            __m512 acc[8];
            for (int q = 0; q < 8; q++) acc[q] = _mm512_setzero_ps();
            for (int64_t i = 0; i < k; i += 16) {
                const __m512 xv = load_tail(xr + i, k - i);
                for (int q = 0; q < qn; q++)
                    acc[q] = _mm512_fmadd_ps(xv, load_tail(a + (q0 + q) * k + i, k - i), acc[q]);
            }
            for (int q = 0; q < qn; q++) u[q0 + q] = scale[s] * _mm512_reduce_add_ps(acc[q]);
        }
        float *o = out + r * ldo;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 keep = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
            __m512 acc = _mm512_maskz_loadu_ps(keep, o + j);
            for (int64_t q = 0; q < rank; q++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(u[q]), _mm512_maskz_loadu_ps(keep, bt + q * n + j), acc);
            _mm512_mask_storeu_ps(o + j, keep, acc);
        }
    }
    return 0;
}
