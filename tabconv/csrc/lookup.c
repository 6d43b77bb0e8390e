/* Native table layers: encode rows straight from the feature map, then sum looked-up table entries.
 *
 * One layer is a "plan" (tc_plan_new): the quantizer's arrays re-laid out once for the kernels. A forward call
 * (tc_forward) walks the output rows (n, h_out, w_out) in tiles of TILE rows; per tile it encodes every
 * codebook (the hash tree reads its split values from the input by (channel, tap) offsets, the exhaustive
 * encoder builds one im2col row at a time in cache and fuses distance and argmin), then sums the tables:
 *   - AVX-512 VBMI + VNNI, int8 tables, K <= 64: 64 / K' codebooks share one 64-byte register (K' = 16, 32 or
 *     64), codes of 16 rows x 4 byte slots are one register, vpermb looks up 64 entries at once and vpdpbusd
 *     adds each row's 4 bytes into its int32 accumulator (exact integer sums, no overflow);
 *   - AVX2, int8 tables, K <= 16: vpshufb looks up 32 rows of one codebook at once (16-entry table row in each
 *     128-bit lane), summed in int16 and widened to int32 every 256 codebooks (|sum| <= 128 * 256);
 *   - everything else (any K, float tables, any CPU): one output row at a time, adding whole table rows
 *     (contiguous over outputs, vectorised by the compiler) into int32 or float accumulators.
 * int8 sums are dequantised once per output: y = scale[m] * sum + bias[m] (the library's formula).
 * The ISA is chosen at run time (tc_isa); tc_force_isa lowers it so tests can compare every path.
 * Threads: OpenMP over row tiles, or over output channels when there are fewer tiles than threads.
 */
#include "lookup.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdatomic.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#define TC_X86 1
#include <immintrin.h>
#else
#define TC_X86 0
#endif

#define TILE 64
#define SMALL_WORK 1e5 /* lookups below which one thread does the whole layer */
#define TAP_SETS 4     /* input stride patterns a plan keeps the taps of */
#define BOOK_ROWS 8    /* calls of this many rows or fewer encode 16 codebooks of a row at once */
#define ISA_PORTABLE 0
#define ISA_AVX2 1
#define ISA_AVX512 2


typedef struct {
    tc_desc d;
    int total;        /* C' = G * C */
    int per_group;    /* M / G */
    int kpad;         /* K' for vpermb (16, 32, 64) or 0 */
    int slots;        /* codebooks per vpermb register: 64 / K' */
    int quads;        /* vpermb registers per group: ceil(C / slots) */
    int32_t *col_ch, *col_ky, *col_kx; /* per padded column over all groups (C' * s) */
    int32_t *split_ch, *split_ky, *split_kx; /* tree: per (codebook, level) */
    float *thr;       /* tree: (C', T) thresholds, T = max(16, K) (padded with +inf) */
    int thr_stride;
    float *proto_t;   /* exhaustive: (C', s, K) = -2 p */
    float *norms;     /* exhaustive: (C', K) */
    int8_t *tab8;     /* int8 (C', K, M / G) */
    float *tabf;      /* float32 (C', K, M / G) */
    int8_t *vtab;     /* vpermb: (M, quads, 64) */
    int8_t *stab;     /* vpshufb: (M, C, 16) */
    float *scale, *bias;
    _Atomic(void *) taps[TAP_SETS]; /* tc_taps per input stride pattern, each claimed once, freed with the plan */
} tc_plan;

/* -------------------------------------------------------------------------------------------- ISA */
static int forced_isa = -1;

static int detect_isa(void) {
#if TC_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

int tc_isa(void) {
    int best = detect_isa();
    return forced_isa >= 0 && forced_isa < best ? forced_isa : best;
}

int tc_force_isa(int isa) { /* -1: the best this CPU has; returns the ISA now in force */
    forced_isa = isa;
    return tc_isa();
}

int tc_version(void) { return 1; }

/* Per-thread scratch buffers, grown as needed and kept for the next call: a layer call is often only a few
 * microseconds of work, and allocating its buffers each time cost as much. Never freed (bounded by the largest
 * layer a thread has run). */
enum { SCRATCH_CODES, SCRATCH_ROW, SCRATCH_ACC, SCRATCH_TILE, SCRATCH_TAPS, SCRATCH_PACKS, SCRATCH_LANES,
       SCRATCH_SLOTS };

static void *scratch(int slot, size_t bytes) {
    static _Thread_local void *buffers[SCRATCH_SLOTS];
    static _Thread_local size_t sizes[SCRATCH_SLOTS];
    if (bytes > sizes[slot]) {
        free(buffers[slot]);
        buffers[slot] = aligned_alloc(64, (bytes + 63) / 64 * 64);
        sizes[slot] = buffers[slot] ? bytes : 0;
    }
    return buffers[slot];
}

/* ------------------------------------------------------------------------------------ geometry */
typedef struct {
    const float *x;
    int64_t sn, sc, sh, sw;
    int64_t h, w, ho, wo, rows;
} tc_input;

/* Where a tile's rows read the input: per row, the offset of its top-left tap (channel 0) and its iy0 / ix0;
 * walked incrementally (one division per tile). Rows past the last one repeat it and are masked off. */
typedef struct {
    int n;               /* slots in use; a slot whose row is -1 is computed and dropped */
    int64_t row[TILE];   /* the output row of each slot */
    int32_t base[TILE], iy0[TILE], ix0[TILE];
} tc_tile;

static void fill_tile(const tc_plan *p, const tc_input *in, int64_t r0, int n, tc_tile *t) {
    int64_t hw = in->ho * in->wo, image = r0 / hw, pos = r0 % hw;
    int64_t oy = pos / in->wo, ox = pos % in->wo;
    t->n = n;
    for (int i = 0; i < TILE; i++) {
        t->row[i] = i < n ? r0 + i : -1;
        if (i < n) {
            t->iy0[i] = (int32_t)oy * p->d.sy - p->d.py;
            t->ix0[i] = (int32_t)ox * p->d.sx - p->d.px;
            t->base[i] = (int32_t)(image * in->sn + t->iy0[i] * in->sh + t->ix0[i] * in->sw);
            if (++ox == in->wo) {
                ox = 0;
                if (++oy == in->ho) { oy = 0; image++; }
            }
        } else {
            t->iy0[i] = t->iy0[0];
            t->ix0[i] = t->ix0[0];
            t->base[i] = t->base[0];
        }
    }
}

/* Per (codebook, level) of a tree, or per padded column: where its value sits relative to a row's base. */
typedef struct {
    int32_t offset, ky, kx, real; /* ky / kx already times the dilation; real = 0 for a padding column */
} tc_tap;

static inline float fetch(const tc_input *in, const tc_tile *t, int i, const tc_tap *tap) {
    if (!tap->real) return 0.0f;
    int32_t iy = t->iy0[i] + tap->ky, ix = t->ix0[i] + tap->kx;
    if (iy < 0 || iy >= in->h || ix < 0 || ix >= in->w) return 0.0f;
    return in->x[(int64_t)t->base[i] + tap->offset];
}

static void make_taps(const tc_plan *p, const tc_input *in, const int32_t *ch, const int32_t *ky, const int32_t *kx,
                      int64_t count, tc_tap *taps) {
    for (int64_t j = 0; j < count; j++) {
        taps[j].real = ch[j] >= 0;
        taps[j].ky = ky[j] * p->d.dy;
        taps[j].kx = kx[j] * p->d.dx;
        taps[j].offset = ch[j] >= 0 ? (int32_t)(ch[j] * in->sc + taps[j].ky * in->sh + taps[j].kx * in->sw) : 0;
    }
}

/* ------------------------------------------------------------------------------------ encoders */
/* What one call shares between its tiles: the input, and where each tree split / im2col column reads it. */
typedef struct {
    tc_input in;
    tc_tap *split; /* tree: (C', depth) */
    tc_tap *column; /* exhaustive: (C' * s) */
    float *lanes;  /* image-lane copy of the input, or NULL */
    int32_t *books; /* tree, few rows: the split taps level-major, (offset, ky, kx) x (depth, C' padded to 16) */
} tc_call;

/* codes: (C', TILE) uint16, codebook-major */
static void encode_tree_portable(const tc_plan *p, const tc_call *call, const tc_tile *t, uint16_t *codes) {
    int depth = p->d.depth;
    for (int i = 0; i < t->n; i++)
        for (int c = 0; c < p->total; c++) {
            int node = 0;
            for (int l = 0; l < depth; l++) {
                float v = fetch(&call->in, t, i, &call->split[c * depth + l]);
                node = 2 * node + (v > p->thr[(int64_t)c * p->thr_stride + (1 << l) - 1 + node]);
            }
            codes[(int64_t)c * TILE + i] = (uint16_t)node;
        }
}

static void im2col_row(const tc_plan *p, const tc_call *call, const tc_tile *t, int i, float *xrow) {
    int64_t cols = (int64_t)p->total * p->d.width;
    for (int64_t j = 0; j < cols; j++) xrow[j] = fetch(&call->in, t, i, &call->column[j]);
}

static void encode_exhaustive_portable(const tc_plan *p, const tc_call *call, const tc_tile *t, uint16_t *codes,
                                       float *xrow, float *scores) {
    int k_count = p->d.centroids, s = p->d.width;
    for (int i = 0; i < t->n; i++) {
        im2col_row(p, call, t, i, xrow);
        for (int c = 0; c < p->total; c++) {
            const float *norm = p->norms + (int64_t)c * k_count, *pt = p->proto_t + (int64_t)c * s * k_count;
            const float *xs = xrow + (int64_t)c * s;
            for (int k = 0; k < k_count; k++) scores[k] = norm[k];
            for (int j = 0; j < s; j++)
                for (int k = 0; k < k_count; k++) scores[k] += xs[j] * pt[(int64_t)j * k_count + k];
            int best = 0;
            for (int k = 1; k < k_count; k++)
                if (scores[k] < scores[best]) best = k;
            codes[(int64_t)c * TILE + i] = (uint16_t)best;
        }
    }
}

#if TC_X86
__attribute__((target("avx512f,avx512bw"))) static void encode_tree_avx512(const tc_plan *p, const tc_call *call,
                                                                            const tc_tile *t, uint16_t *codes) {
    int depth = p->d.depth, small = p->thr_stride == 16;
    const tc_input *in = &call->in;
    __m512i hv = _mm512_set1_epi32((int32_t)in->h), wv = _mm512_set1_epi32((int32_t)in->w);
    for (int b = 0; b < t->n; b += 16) {
        int lanes = t->n - b < 16 ? t->n - b : 16;
        __mmask16 valid = (__mmask16)((1u << lanes) - 1);
        __m512i base = _mm512_loadu_si512(t->base + b), iy0 = _mm512_loadu_si512(t->iy0 + b);
        __m512i ix0 = _mm512_loadu_si512(t->ix0 + b);
        for (int c = 0; c < p->total; c++) {
            __m512i node = _mm512_setzero_si512();
            const float *thr = p->thr + (int64_t)c * p->thr_stride;
            __m512 thr16 = small ? _mm512_loadu_ps(thr) : _mm512_setzero_ps();
            const tc_tap *tap = call->split + c * depth;
            for (int l = 0; l < depth; l++, tap++) {
                __m512 v = _mm512_setzero_ps();
                if (tap->real) {
                    __mmask16 ok = valid & _mm512_cmplt_epu32_mask(_mm512_add_epi32(iy0, _mm512_set1_epi32(tap->ky)), hv) &
                                   _mm512_cmplt_epu32_mask(_mm512_add_epi32(ix0, _mm512_set1_epi32(tap->kx)), wv);
                    v = _mm512_mask_i32gather_ps(v, ok, _mm512_add_epi32(base, _mm512_set1_epi32(tap->offset)), in->x, 4);
                }
                __m512i at = _mm512_add_epi32(node, _mm512_set1_epi32((1 << l) - 1));
                __m512 th = small ? _mm512_permutexvar_ps(at, thr16) : _mm512_i32gather_ps(at, thr, 4);
                __mmask16 right = _mm512_cmp_ps_mask(v, th, _CMP_GT_OQ);
                node = _mm512_slli_epi32(node, 1);
                node = _mm512_mask_add_epi32(node, right, node, _mm512_set1_epi32(1));
            }
            _mm256_storeu_si256((__m256i *)(codes + (int64_t)c * TILE + b), _mm512_cvtepi32_epi16(node));
        }
    }
}

__attribute__((target("avx512f,avx512bw"))) static void encode_exhaustive_avx512(const tc_plan *p,
                                                                                  const tc_call *call,
                                                                                  const tc_tile *t, uint16_t *codes,
                                                                                  float *xrow, float *scores) {
    if (p->d.centroids != 16) {
        encode_exhaustive_portable(p, call, t, codes, xrow, scores);
        return;
    }
    int s = p->d.width;
    for (int i = 0; i < t->n; i++) {
        im2col_row(p, call, t, i, xrow);
        for (int c = 0; c < p->total; c++) {
            __m512 acc = _mm512_loadu_ps(p->norms + (int64_t)c * 16);
            const float *pt = p->proto_t + (int64_t)c * s * 16, *xs = xrow + (int64_t)c * s;
            for (int j = 0; j < s; j++) acc = _mm512_fmadd_ps(_mm512_set1_ps(xs[j]), _mm512_loadu_ps(pt + j * 16), acc);
            __mmask16 at = _mm512_cmp_ps_mask(acc, _mm512_set1_ps(_mm512_reduce_min_ps(acc)), _CMP_EQ_OQ);
            codes[(int64_t)c * TILE + i] = (uint16_t)(at ? __builtin_ctz(at) : 0);
        }
    }
}

__attribute__((target("avx2,fma"))) static void encode_tree_avx2(const tc_plan *p, const tc_call *call,
                                                                  const tc_tile *t, uint16_t *codes) {
    int depth = p->d.depth;
    const tc_input *in = &call->in;
    __m256i hv = _mm256_set1_epi32((int32_t)in->h), wv = _mm256_set1_epi32((int32_t)in->w);
    __m256i minus1 = _mm256_set1_epi32(-1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int b = 0; b < t->n; b += 8) {
        __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(t->n - b), lane);
        __m256i base = _mm256_loadu_si256((const __m256i *)(t->base + b));
        __m256i iy0 = _mm256_loadu_si256((const __m256i *)(t->iy0 + b));
        __m256i ix0 = _mm256_loadu_si256((const __m256i *)(t->ix0 + b));
        for (int c = 0; c < p->total; c++) {
            __m256i node = _mm256_setzero_si256();
            const float *thr = p->thr + (int64_t)c * p->thr_stride;
            const tc_tap *tap = call->split + c * depth;
            for (int l = 0; l < depth; l++, tap++) {
                __m256 v = _mm256_setzero_ps();
                if (tap->real) {
                    __m256i iy = _mm256_add_epi32(iy0, _mm256_set1_epi32(tap->ky));
                    __m256i ix = _mm256_add_epi32(ix0, _mm256_set1_epi32(tap->kx));
                    /* 0 <= i < size  <=>  i > -1 and size > i */
                    __m256i ok = _mm256_and_si256(valid, _mm256_and_si256(
                        _mm256_and_si256(_mm256_cmpgt_epi32(iy, minus1), _mm256_cmpgt_epi32(hv, iy)),
                        _mm256_and_si256(_mm256_cmpgt_epi32(ix, minus1), _mm256_cmpgt_epi32(wv, ix))));
                    __m256i idx = _mm256_and_si256(_mm256_add_epi32(base, _mm256_set1_epi32(tap->offset)), ok);
                    v = _mm256_mask_i32gather_ps(v, in->x, idx, _mm256_castsi256_ps(ok), 4);
                }
                __m256 th = _mm256_i32gather_ps(thr, _mm256_add_epi32(node, _mm256_set1_epi32((1 << l) - 1)), 4);
                __m256i right = _mm256_castps_si256(_mm256_cmp_ps(v, th, _CMP_GT_OQ));
                node = _mm256_sub_epi32(_mm256_slli_epi32(node, 1), right); /* right is -1 where true */
            }
            int32_t out[8];
            _mm256_storeu_si256((__m256i *)out, node);
            for (int i = 0; i < 8 && b + i < t->n; i++) codes[(int64_t)c * TILE + b + i] = (uint16_t)out[i];
        }
    }
}
#endif

#if TC_X86
/* r[i] lane j -> r[j] lane i: unpack pairs, then 4x4 blocks within 128-bit lanes, then the lanes themselves. */
__attribute__((target("avx512f"))) static inline void transpose16(__m512 *r) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* r[i + j] lane k: rows i..i+3 of column 4k + j */
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
        t[j] = _mm512_shuffle_f32x4(a, c, 0x88);
        t[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
        t[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* One block of at most 16 x 16: rows i < np of `src` (leading dimension ld_src), columns j < nm -> dst[j][i]. */
__attribute__((target("avx512f"))) static void planes_block(const float *src, int64_t ld_src, float *dst,
                                                            int64_t ld_dst, int np, int nm) {
    __mmask16 columns = nm == 16 ? 0xFFFF : (__mmask16)((1u << nm) - 1);
    __mmask16 rows = np == 16 ? 0xFFFF : (__mmask16)((1u << np) - 1);
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = i < np ? _mm512_maskz_loadu_ps(columns, src + i * ld_src) : _mm512_setzero_ps();
    transpose16(r); /* r[j] lane i: src row i, column j */
    for (int j = 0; j < nm; j++) _mm512_mask_storeu_ps(dst + j * ld_dst, rows, r[j]);
}

/* Image lanes: the input re-laid out as (N / 16, C_in, H, W, 16), one lane per image, so that one tree split of 16
 * rows (16 images at one output position) is one contiguous load instead of a gather. Slot j * 16 + i of the tile
 * is image 16 * block + i at the tile's j-th output position. */
__attribute__((target("avx512f,avx512bw"))) static void encode_tree_lanes(const tc_plan *p, const tc_call *call,
                                                                           const tc_tile *t, uint16_t *codes) {
    int depth = p->d.depth, small = p->thr_stride == 16;
    const tc_input *in = &call->in;
    for (int b = 0; b < t->n; b += 16) {
        int32_t iy0 = t->iy0[b], ix0 = t->ix0[b];
        const float *base = call->lanes + (int64_t)t->base[b] * 16;
        /* four codebooks at a time: four independent compare chains in flight */
        for (int c0 = 0; c0 < p->total; c0 += 4) {
            int width = p->total - c0 < 4 ? p->total - c0 : 4;
            __m512i node[4];
            __m512 thr16[4];
            for (int u = 0; u < width; u++) {
                node[u] = _mm512_setzero_si512();
                thr16[u] = small ? _mm512_loadu_ps(p->thr + (int64_t)(c0 + u) * 16) : _mm512_setzero_ps();
            }
            for (int l = 0; l < depth; l++) {
                __m512i offset = _mm512_set1_epi32((1 << l) - 1);
                for (int u = 0; u < width; u++) {
                    const tc_tap *tap = call->split + (c0 + u) * depth + l;
                    int32_t iy = iy0 + tap->ky, ix = ix0 + tap->kx;
                    __m512 v = tap->real && iy >= 0 && iy < in->h && ix >= 0 && ix < in->w
                                   ? _mm512_load_ps(base + (int64_t)tap->offset * 16) : _mm512_setzero_ps();
                    __m512i at = _mm512_add_epi32(node[u], offset);
                    __m512 th = small ? _mm512_permutexvar_ps(at, thr16[u])
                                      : _mm512_i32gather_ps(at, p->thr + (int64_t)(c0 + u) * p->thr_stride, 4);
                    __mmask16 right = _mm512_cmp_ps_mask(v, th, _CMP_GT_OQ);
                    node[u] = _mm512_slli_epi32(node[u], 1);
                    node[u] = _mm512_mask_add_epi32(node[u], right, node[u], _mm512_set1_epi32(1));
                }
            }
            for (int u = 0; u < width; u++)
                _mm256_storeu_si256((__m256i *)(codes + (int64_t)(c0 + u) * TILE + b), _mm512_cvtepi32_epi16(node[u]));
        }
    }
}

/* Few rows (BOOK_ROWS or fewer): one row at a time with 16 codebooks in the lanes, so that every lane of a gather
 * is used (row lanes would leave 15 of 16 empty for a single row). A padding tap has ky far out of range. */
__attribute__((target("avx512f,avx512bw"))) static void encode_tree_books(const tc_plan *p, const tc_call *call,
                                                                           const tc_tile *t, uint16_t *codes) {
    int depth = p->d.depth, total = p->total, padded = (total + 15) / 16 * 16;
    const tc_input *in = &call->in;
    const int32_t *off = call->books, *ky = off + depth * padded, *kx = ky + depth * padded;
    __m512i hv = _mm512_set1_epi32((int32_t)in->h), wv = _mm512_set1_epi32((int32_t)in->w);
    __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int i = 0; i < t->n; i++) {
        __m512i base = _mm512_set1_epi32(t->base[i]), iy0 = _mm512_set1_epi32(t->iy0[i]);
        __m512i ix0 = _mm512_set1_epi32(t->ix0[i]);
        for (int c0 = 0; c0 < total; c0 += 16) {
            __mmask16 valid = total - c0 >= 16 ? 0xFFFF : (__mmask16)((1u << (total - c0)) - 1);
            const float *thr = p->thr + (int64_t)c0 * p->thr_stride; /* lane j: codebook c0 + j's thresholds */
            __m512i row = _mm512_mullo_epi32(lane, _mm512_set1_epi32(p->thr_stride));
            __m512i node = _mm512_setzero_si512();
            for (int l = 0; l < depth; l++) {
                int64_t at = (int64_t)l * padded + c0;
                __mmask16 ok = valid &
                               _mm512_cmplt_epu32_mask(_mm512_add_epi32(iy0, _mm512_loadu_si512(ky + at)), hv) &
                               _mm512_cmplt_epu32_mask(_mm512_add_epi32(ix0, _mm512_loadu_si512(kx + at)), wv);
                __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok,
                                                    _mm512_add_epi32(base, _mm512_loadu_si512(off + at)), in->x, 4);
                __m512i at_thr = _mm512_add_epi32(row, _mm512_add_epi32(node, _mm512_set1_epi32((1 << l) - 1)));
                __m512 th = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, at_thr, thr, 4);
                __mmask16 right = _mm512_cmp_ps_mask(v, th, _CMP_GT_OQ);
                node = _mm512_slli_epi32(node, 1);
                node = _mm512_mask_add_epi32(node, right, node, _mm512_set1_epi32(1));
            }
            int32_t found[16];
            _mm512_storeu_si512(found, node);
            for (int j = 0; j < 16 && c0 + j < total; j++) codes[(int64_t)(c0 + j) * TILE + i] = (uint16_t)found[j];
        }
    }
}

/* The split taps level-major for encode_tree_books (padding taps: ky out of any input's range). */
static void book_taps(const tc_plan *p, const tc_tap *split, int32_t *books) {
    int depth = p->d.depth, total = p->total, padded = (total + 15) / 16 * 16;
    int32_t *off = books, *ky = off + depth * padded, *kx = ky + depth * padded;
    for (int l = 0; l < depth; l++)
        for (int c = 0; c < padded; c++) {
            const tc_tap *tap = c < total ? split + c * depth + l : NULL;
            int real = tap && tap->real;
            off[l * padded + c] = real ? tap->offset : 0;
            ky[l * padded + c] = real ? tap->ky : INT32_MIN / 2;
            kx[l * padded + c] = real ? tap->kx : 0;
        }
}

/* (N, C_in, H, W) at any strides -> (ceil(N / 16), C_in, H, W, 16), missing images zero. */
__attribute__((target("avx512f"))) static void to_lanes(const tc_input *in, int64_t images, int64_t channels,
                                                         float *lanes, int threads) {
    int64_t blocks = (images + 15) / 16, planes = blocks * channels, hw = in->h * in->w;
    if (in->sc == 1) { /* channels-last: 16 channels of 16 images are 16 loads and one transpose */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t item = 0; item < blocks * hw; item++) {
            int64_t block = item / hw, pixel = item % hw, y = pixel / in->w, x = pixel % in->w;
            const float *src = in->x + y * in->sh + x * in->sw;
            for (int64_t c0 = 0; c0 < channels; c0 += 16) {
                int count = channels - c0 < 16 ? (int)(channels - c0) : 16;
                __mmask16 keep = (__mmask16)((1u << count) - 1);
                __m512 r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = block * 16 + i < images ? _mm512_maskz_loadu_ps(keep, src + (block * 16 + i) * in->sn + c0)
                                                   : _mm512_setzero_ps();
                transpose16(r); /* r[k] lane i: channel c0 + k of image 16 * block + i */
                for (int k = 0; k < count; k++)
                    _mm512_store_ps(lanes + ((block * channels + c0 + k) * hw + pixel) * 16, r[k]);
            }
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t plane = 0; plane < planes; plane++) {
        int64_t block = plane / channels, ch = plane % channels;
        int count = images - block * 16 < 16 ? (int)(images - block * 16) : 16;
        __mmask16 keep = (__mmask16)((1u << count) - 1);
        __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int32_t)in->sn));
        const float *src = in->x + block * 16 * in->sn + ch * in->sc;
        float *dst = lanes + plane * hw * 16;
        for (int64_t y = 0; y < in->h; y++)
            for (int64_t x = 0; x < in->w; x++)
                _mm512_store_ps(dst + (y * in->w + x) * 16,
                                _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, step, src + y * in->sh + x * in->sw, 4));
    }
}
#endif

/* Image-lane tile: up to TILE / 16 (image block, output position) pairs, pairs numbered block-major from `first`,
 * so that a small feature map still fills a tile from several blocks of 16 images (the tables are then read once
 * for 64 rows, not 16). */
static void fill_lane_tile(const tc_plan *p, const tc_input *in, int64_t images, int64_t channels, int64_t first,
                           int count, tc_tile *t) {
    int64_t hw_out = in->ho * in->wo;
    t->n = count * 16;
    for (int j = 0; j < count; j++) {
        int64_t block = (first + j) / hw_out, pos = (first + j) % hw_out;
        int32_t iy0 = (int32_t)(pos / in->wo) * p->d.sy - p->d.py, ix0 = (int32_t)(pos % in->wo) * p->d.sx - p->d.px;
        for (int i = 0; i < 16; i++) {
            int s = j * 16 + i;
            int64_t image = block * 16 + i;
            t->row[s] = image < images ? image * hw_out + pos : -1;
            t->iy0[s] = iy0;
            t->ix0[s] = ix0;
            /* element offset in the lane layout, in units of 16 floats: plane (block, channel 0), then (iy0, ix0) */
            t->base[s] = (int32_t)(block * channels * in->h * in->w + (int64_t)iy0 * in->w + ix0);
        }
    }
    for (int s = t->n; s < TILE; s++) t->row[s] = -1;
}

static void encode_tile(const tc_plan *p, const tc_call *call, int isa, const tc_tile *t, uint16_t *codes,
                        float *xrow, float *scores) {
    if (t->n < TILE) /* the rows past the last one are looked up too (and dropped): give them code 0 */
        for (int c = 0; c < p->total; c++) memset(codes + (int64_t)c * TILE + t->n, 0, sizeof(uint16_t) * (TILE - t->n));
    if (p->d.encoder == 1) {
#if TC_X86
        if (call->lanes) return encode_tree_lanes(p, call, t, codes);
        if (call->books && isa == ISA_AVX512) return encode_tree_books(p, call, t, codes);
        if (isa == ISA_AVX512) return encode_tree_avx512(p, call, t, codes);
        if (isa == ISA_AVX2) return encode_tree_avx2(p, call, t, codes);
#endif
        encode_tree_portable(p, call, t, codes);
        return;
    }
#if TC_X86
    if (isa == ISA_AVX512) return encode_exhaustive_avx512(p, call, t, codes, xrow, scores);
#endif
    encode_exhaustive_portable(p, call, t, codes, xrow, scores);
}

/* ------------------------------------------------------------------------------------- lookups */
/* Outputs are rows: out[r * M + m] (channels-last for a conv, the layout the next layers run fastest on). */

/* One output row's outputs j0 .. j1 - 1 of group g: `code` points at the row's code of the group's first codebook
 * (the next codebook's is TILE further), `y` at the row's outputs, `acc` at M / G scratch values. */
typedef void (*tc_row_lookup)(const tc_plan *p, const uint16_t *code, int g, int j0, int j1, float *y, void *acc);

/* Every row of a tile, the outputs m0 .. m1 - 1 of each, through `row_lookup` once per (row, group). */
static void lookup_rows(const tc_plan *p, const tc_tile *t, const uint16_t *codes, int m0, int m1, float *out,
                        void *acc, tc_row_lookup row_lookup) {
    int per = p->per_group, cb = p->d.codebooks, m_total = p->d.out_features;
    for (int i = 0; i < t->n; i++) {
        if (t->row[i] < 0) continue;
        for (int g = m0 / per; g * per < m1; g++) {
            int j0 = m0 > g * per ? m0 - g * per : 0, j1 = m1 < (g + 1) * per ? m1 - g * per : per;
            row_lookup(p, codes + (int64_t)g * cb * TILE + i, g, j0, j1, out + t->row[i] * m_total, acc);
        }
    }
}

/* Any K, any table dtype, any CPU: whole table rows added (contiguous over outputs). */
static void row_portable(const tc_plan *p, const uint16_t *code, int g, int j0, int j1, float *y, void *acc_buffer) {
    int per = p->per_group, cb = p->d.codebooks, k_count = p->d.centroids;
    if (p->d.lut == 1) {
        int32_t *acc = (int32_t *)acc_buffer;
        memset(acc, 0, sizeof(int32_t) * (size_t)(j1 - j0));
        for (int c = 0; c < cb; c++) {
            const int8_t *row = p->tab8 + ((int64_t)(g * cb + c) * k_count + code[(int64_t)c * TILE]) * per + j0;
            for (int j = 0; j < j1 - j0; j++) acc[j] += row[j];
        }
        for (int j = j0; j < j1; j++) {
            int m = g * per + j;
            y[m] = p->scale[m] * (float)acc[j - j0] + p->bias[m];
        }
        return;
    }
    float *acc = (float *)acc_buffer;
    memset(acc, 0, sizeof(float) * (size_t)(j1 - j0));
    for (int c = 0; c < cb; c++) {
        const float *row = p->tabf + ((int64_t)(g * cb + c) * k_count + code[(int64_t)c * TILE]) * per + j0;
        for (int j = 0; j < j1 - j0; j++) acc[j] += row[j];
    }
    for (int j = j0; j < j1; j++) y[g * per + j] = acc[j - j0];
}

#if TC_X86
/* Few rows (or K > 64, or float tables) with AVX-512: 32 int8 outputs per register widened to int16 (flushed to
 * int32 every 256 codebooks: |sum| <= 128 * 256), up to 512 outputs at once so that each codebook's table row is
 * read as one contiguous run; or 16 float outputs per register. */
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void row_avx512(const tc_plan *p, const uint16_t *code,
                                                                             int g, int j0, int j1, float *y,
                                                                             void *acc_buffer) {
    int per = p->per_group, cb = p->d.codebooks, k_count = p->d.centroids;
    (void)acc_buffer;
    if (p->d.lut != 1) {
        for (int j = j0; j < j1; j += 16) {
            int count = j1 - j < 16 ? j1 - j : 16;
            __mmask16 keep = (__mmask16)((1u << count) - 1);
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < cb; c++) {
                const float *row = p->tabf + ((int64_t)(g * cb + c) * k_count + code[(int64_t)c * TILE]) * per + j;
                sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(keep, row));
            }
            _mm512_mask_storeu_ps(y + g * per + j, keep, sum);
        }
        return;
    }
    for (int j = j0; j < j1; j += 512) {
        int span = j1 - j < 512 ? j1 - j : 512, regs = (span + 31) / 32;
        __mmask32 keep[16];
        for (int v = 0; v < regs; v++) {
            int count = span - 32 * v < 32 ? span - 32 * v : 32;
            keep[v] = count == 32 ? 0xFFFFFFFFu : (__mmask32)((1u << count) - 1);
        }
        __m512i wide[32];
        for (int v = 0; v < 2 * regs; v++) wide[v] = _mm512_setzero_si512();
        for (int c0 = 0; c0 < cb; c0 += 256) {
            int c1 = c0 + 256 < cb ? c0 + 256 : cb;
            __m512i sum[16];
            for (int v = 0; v < regs; v++) sum[v] = _mm512_setzero_si512();
            for (int c = c0; c < c1; c++) {
                const int8_t *row = p->tab8 + ((int64_t)(g * cb + c) * k_count + code[(int64_t)c * TILE]) * per + j;
                for (int v = 0; v < regs; v++)
                    sum[v] = _mm512_add_epi16(sum[v], _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(keep[v], row + 32 * v)));
            }
            for (int v = 0; v < regs; v++) {
                wide[2 * v] = _mm512_add_epi32(wide[2 * v], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(sum[v])));
                wide[2 * v + 1] = _mm512_add_epi32(wide[2 * v + 1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(sum[v], 1)));
            }
        }
        for (int v = 0; v < 2 * regs; v++) {
            int m = g * per + j + 16 * v, count = j1 - (j + 16 * v);
            if (count <= 0) break;
            __mmask16 lanes = count >= 16 ? 0xFFFF : (__mmask16)((1u << count) - 1);
            __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(wide[v]), _mm512_maskz_loadu_ps(lanes, p->scale + m),
                                       _mm512_maskz_loadu_ps(lanes, p->bias + m));
            _mm512_mask_storeu_ps(y + m, lanes, a);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni"))) static void lookup_vpermb(
    const tc_plan *p, const tc_tile *t, const uint16_t *codes, int m0, int m1, float *out) {
    int n = t->n;
    int per = p->per_group, cb = p->d.codebooks, quads = p->quads, slots = p->slots, kpad = p->kpad;
    int m_total = p->d.out_features, blocks = (n + 15) / 16, groups = p->d.groups;
    /* one dpbusd weight per used byte slot: 1 for each of the `slots` codebooks of a 4-byte group */
    uint32_t weight = slots == 4 ? 0x01010101u : slots == 2 ? 0x00000101u : 0x00000001u;
    __m512i ones = _mm512_set1_epi32((int32_t)weight);
    size_t count = (size_t)blocks * quads * groups;
    __m512i *packs = (__m512i *)scratch(SCRATCH_PACKS, sizeof(__m512i) * count);
    if (!packs) return;
    /* codes of 16 rows x `slots` codebooks per register, byte `slot` of each row = code + slot * K' */
    for (int g = 0; g < groups; g++)
        for (int q = 0; q < quads; q++)
            for (int b = 0; b < blocks; b++) {
                __m512i v = _mm512_setzero_si512();
                for (int slot = 0; slot < slots; slot++) {
                    int c = q * slots + slot;
                    /* a slot past the last codebook looks up its own all-zero table entries */
                    __m512i code = _mm512_set1_epi32(slot * kpad);
                    if (c < cb) {
                        const uint16_t *src = codes + (int64_t)(g * cb + c) * TILE + b * 16;
                        code = _mm512_add_epi32(code, _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)));
                    }
                    v = _mm512_or_si512(v, _mm512_slli_epi32(code, 8 * slot));
                }
                packs[((int64_t)g * quads + q) * blocks + b] = v;
            }
    /* Four outputs x up to four row blocks per pass: each table register feeds four lookups (one per block) and
     * each code register four (one per output), sixteen independent accumulators hide vpdpbusd's latency, and
     * the tables are read from the cache once per tile instead of once per block. */
    __m512 y[4][16];
    for (int mm = m0; mm < m1; mm += 16) {
        int count_m = m1 - mm < 16 ? m1 - mm : 16;
        for (int mi = 0; mi < count_m;) {
            int m = mm + mi;
            const __m512i *pk = packs + (int64_t)(m / per) * quads * blocks;
            const __m512i *tab = (const __m512i *)(p->vtab + (int64_t)m * quads * 64);
            int width = count_m - mi >= 4 && (m + 3) / per == m / per ? 4 : 1;
            __m512i acc[4][4];
            for (int u = 0; u < 4; u++)
                for (int b = 0; b < 4; b++) acc[u][b] = _mm512_setzero_si512();
            for (int q = 0; q < quads; q++) {
                const __m512i *codes_q = pk + (int64_t)q * blocks;
                for (int u = 0; u < width; u++) {
                    __m512i t = _mm512_loadu_si512(tab + (int64_t)u * quads + q);
                    for (int b = 0; b < blocks; b++)
                        acc[u][b] = _mm512_dpbusd_epi32(acc[u][b], ones, _mm512_permutexvar_epi8(codes_q[b], t));
                }
            }
            for (int u = 0; u < width; u++)
                for (int b = 0; b < blocks; b++)
                    y[b][mi + u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[u][b]), _mm512_set1_ps(p->scale[m + u]),
                                                   _mm512_set1_ps(p->bias[m + u]));
            mi += width;
        }
        __mmask16 keep = (__mmask16)((1u << count_m) - 1);
        for (int b = 0; b < blocks; b++) {
            int rows = n - b * 16 < 16 ? n - b * 16 : 16;
            for (int mi = count_m; mi < 16; mi++) y[b][mi] = _mm512_setzero_ps();
            transpose16(y[b]); /* y[b][i]: the 16 outputs mm.. of the block's row i */
            for (int i = 0; i < rows; i++)
                if (t->row[b * 16 + i] >= 0) _mm512_mask_storeu_ps(out + t->row[b * 16 + i] * m_total + mm, keep, y[b][i]);
        }
    }
}

__attribute__((target("avx2,fma"))) static void lookup_vpshufb(const tc_plan *p, const tc_tile *t,
                                                                const uint16_t *codes, int m0, int m1, float *out) {
    int n = t->n, per = p->per_group, cb = p->d.codebooks, m_total = p->d.out_features;
    for (int h = 0; h < (n + 31) / 32; h++) {
        int base_row = h * 32, lanes = n - base_row < 32 ? n - base_row : 32;
        for (int m = m0; m < m1; m++) {
            int g = m / per;
            const int8_t *tab = p->stab + (int64_t)m * cb * 16;
            __m256i wide[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                               _mm256_setzero_si256()};
            for (int c0 = 0; c0 < cb; c0 += 256) { /* int16 sums widened every 256 codebooks: |sum| <= 128 * 256 */
                int c1 = c0 + 256 < cb ? c0 + 256 : cb;
                __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
                for (int c = c0; c < c1; c++) {
                    const uint16_t *src = codes + (int64_t)(g * cb + c) * TILE + base_row;
                    __m256i a = _mm256_loadu_si256((const __m256i *)src), b = _mm256_loadu_si256((const __m256i *)(src + 16));
                    __m256i idx = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
                    __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tab + (int64_t)c * 16)));
                    __m256i v = _mm256_shuffle_epi8(t, idx);
                    lo = _mm256_add_epi16(lo, _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
                    hi = _mm256_add_epi16(hi, _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)));
                }
                wide[0] = _mm256_add_epi32(wide[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo)));
                wide[1] = _mm256_add_epi32(wide[1], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo, 1)));
                wide[2] = _mm256_add_epi32(wide[2], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi)));
                wide[3] = _mm256_add_epi32(wide[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi, 1)));
            }
            float y[32];
            __m256 scale = _mm256_set1_ps(p->scale[m]), bias = _mm256_set1_ps(p->bias[m]);
            for (int q = 0; q < 4; q++) _mm256_storeu_ps(y + 8 * q, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide[q]), scale, bias));
            for (int i = 0; i < lanes; i++)
                if (t->row[base_row + i] >= 0) out[t->row[base_row + i] * m_total + m] = y[i];
        }
    }
}
#endif

/* ------------------------------------------------------------------------------------- plans */
static void *copy_of(const void *src, size_t bytes) {
    void *dst = malloc(bytes ? bytes : 1);
    if (dst && bytes) memcpy(dst, src, bytes);
    return dst;
}

static void free_taps(void *set);

void tc_plan_free(void *handle) {
    tc_plan *p = (tc_plan *)handle;
    if (!p) return;
    free(p->col_ch); free(p->col_ky); free(p->col_kx);
    free(p->split_ch); free(p->split_ky); free(p->split_kx);
    free(p->thr); free(p->proto_t); free(p->norms);
    free(p->tab8); free(p->tabf); free(p->vtab); free(p->stab);
    free(p->scale); free(p->bias);
    for (int slot = 0; slot < TAP_SETS; slot++) free_taps(atomic_load(&p->taps[slot]));
    free(p);
}

/* int8 tables re-laid out per output for the shuffles: output m gets `regs` registers of `bytes` bytes, codebook c
 * fills slot c % slots of register c / slots with its K entries (at slot * kpad); unused entries stay 0. */
static int8_t *per_output_tables(const tc_plan *p, int regs, int bytes, int slots, int kpad) {
    int per = p->per_group, cb = p->d.codebooks, k_count = p->d.centroids;
    int8_t *out = calloc((size_t)p->d.out_features * regs * bytes, 1);
    if (!out) return NULL;
    for (int m = 0; m < p->d.out_features; m++) {
        int g = m / per, j = m % per;
        for (int c = 0; c < cb; c++)
            for (int k = 0; k < k_count; k++)
                out[((int64_t)m * regs + c / slots) * bytes + (c % slots) * kpad + k] =
                    p->tab8[(((int64_t)g * cb + c) * k_count + k) * per + j];
    }
    return out;
}

void *tc_plan_new(const tc_desc *d) {
    tc_plan *p = (tc_plan *)calloc(1, sizeof(tc_plan));
    if (!p) return NULL;
    p->d = *d;
    int total = d->groups * d->codebooks, s = d->width, k_count = d->centroids;
    int per = d->out_features / d->groups;
    p->total = total;
    p->per_group = per;
    size_t cols = (size_t)total * s;
    p->col_ch = copy_of(d->column_channel, cols * 4);
    p->col_ky = copy_of(d->column_ky, cols * 4);
    p->col_kx = copy_of(d->column_kx, cols * 4);
    if (d->encoder == 1) {
        int depth = d->depth;
        p->split_ch = malloc((size_t)total * depth * 4);
        p->split_ky = malloc((size_t)total * depth * 4);
        p->split_kx = malloc((size_t)total * depth * 4);
        p->thr_stride = k_count > 16 ? k_count : 16;
        p->thr = malloc((size_t)total * p->thr_stride * 4);
        if (!p->split_ch || !p->split_ky || !p->split_kx || !p->thr) goto fail;
        for (int c = 0; c < total; c++) {
            for (int l = 0; l < depth; l++) {
                int64_t col = (int64_t)c * s + d->split_dims[c * depth + l];
                p->split_ch[c * depth + l] = p->col_ch[col];
                p->split_ky[c * depth + l] = p->col_ky[col];
                p->split_kx[c * depth + l] = p->col_kx[col];
            }
            for (int t = 0; t < p->thr_stride; t++)
                p->thr[(int64_t)c * p->thr_stride + t] = t < k_count - 1 ? d->thresholds[(int64_t)c * (k_count - 1) + t] : INFINITY;
        }
    } else {
        p->proto_t = malloc((size_t)total * s * k_count * 4);
        p->norms = malloc((size_t)total * k_count * 4);
        if (!p->proto_t || !p->norms) goto fail;
        for (int c = 0; c < total; c++)
            for (int k = 0; k < k_count; k++) {
                const float *proto = d->prototypes + ((int64_t)c * k_count + k) * s;
                float norm = 0.0f;
                for (int j = 0; j < s; j++) {
                    norm += proto[j] * proto[j];
                    p->proto_t[((int64_t)c * s + j) * k_count + k] = -2.0f * proto[j];
                }
                p->norms[(int64_t)c * k_count + k] = norm;
            }
    }
    size_t entries = (size_t)total * k_count * per;
    if (d->lut == 1) {
        p->tab8 = copy_of(d->tables, entries);
        p->scale = copy_of(d->scale, (size_t)d->out_features * 4);
        p->bias = copy_of(d->bias, (size_t)d->out_features * 4);
        if (!p->tab8 || !p->scale || !p->bias) goto fail;
        if (k_count <= 64) {
            p->kpad = k_count <= 16 ? 16 : k_count <= 32 ? 32 : 64;
            p->slots = 64 / p->kpad;
            p->quads = (d->codebooks + p->slots - 1) / p->slots;
            p->vtab = per_output_tables(p, p->quads, 64, p->slots, p->kpad);
            if (!p->vtab) goto fail;
        }
        if (k_count <= 16) {
            p->stab = per_output_tables(p, d->codebooks, 16, 1, 16);
            if (!p->stab) goto fail;
        }
    } else {
        p->tabf = copy_of(d->tables, entries * 4);
        if (!p->tabf) goto fail;
    }
    if (!p->col_ch || !p->col_ky || !p->col_kx) goto fail;
    return p;
fail:
    tc_plan_free(p);
    return NULL;
}

/* Which lookup a tile of n rows takes at this ISA: 2 vpermb, 1 vpshufb, 3 rows with AVX-512, 0 rows portable. */
static int lookup_path(const tc_plan *p, int isa, int n) {
    if (isa == ISA_AVX512 && p->vtab && n >= 8) return 2;
    if (isa >= ISA_AVX2 && p->stab && n >= 16) return 1;
    return isa == ISA_AVX512 ? 3 : 0;
}

int tc_lookup_path(const void *handle, int rows) {
    return lookup_path((const tc_plan *)handle, tc_isa(), rows < TILE ? rows : TILE);
}

/* ------------------------------------------------------------------------------------ drivers */
static void lookup_tile(const tc_plan *p, int isa, const tc_tile *tile, const uint16_t *codes, int m0, int m1,
                        float *out, void *acc) {
    int path = lookup_path(p, isa, tile->n);
#if TC_X86
    if (path == 3) { lookup_rows(p, tile, codes, m0, m1, out, acc, row_avx512); return; }
    if (path == 2) { lookup_vpermb(p, tile, codes, m0, m1, out); return; }
    if (path == 1) { lookup_vpshufb(p, tile, codes, m0, m1, out); return; }
#endif
    (void)path;
    lookup_rows(p, tile, codes, m0, m1, out, acc, row_portable);
}

/* Image lanes pay for themselves from 16 images on (below, most lanes would be empty). */
static int use_lanes(const tc_plan *p, int isa, int64_t images) {
    return TC_X86 && isa == ISA_AVX512 && p->d.encoder == 1 && images >= 16;
}

/* Where a plan's tree splits (or im2col columns) read an input of given strides, with the level-major copy
 * encode_tree_books reads. Computing them costs about as much as a small layer's lookups, and a layer sees one or
 * two stride patterns (its input size, and the image-lane layout), so a plan keeps up to TAP_SETS of them: each
 * slot is claimed once with a compare-and-swap and never replaced, so readers need no lock. */
typedef struct {
    int64_t sc, sh, sw;
    tc_tap *taps; /* tree: (C', depth); exhaustive: (C' * s) */
    int32_t *books; /* tree: (offset, ky, kx) x (depth, C' padded to 16); NULL for the exhaustive encoder */
} tc_taps;

static void free_taps(void *handle) {
    tc_taps *set = (tc_taps *)handle;
    if (!set) return;
    free(set->taps);
    free(set->books);
    free(set);
}

static tc_taps *make_tap_set(const tc_plan *p, const tc_input *geometry) {
    int tree = p->d.encoder == 1;
    int64_t count = tree ? (int64_t)p->total * p->d.depth : (int64_t)p->total * p->d.width;
    int64_t padded = (p->total + 15) / 16 * 16;
    tc_taps *set = calloc(1, sizeof(tc_taps));
    if (!set) return NULL;
    set->sc = geometry->sc, set->sh = geometry->sh, set->sw = geometry->sw;
    set->taps = malloc(sizeof(tc_tap) * (size_t)(count ? count : 1));
    set->books = tree ? malloc(sizeof(int32_t) * 3 * (size_t)p->d.depth * (size_t)padded) : NULL;
    if (!set->taps || (tree && !set->books)) {
        free_taps(set);
        return NULL;
    }
    if (tree) {
        make_taps(p, geometry, p->split_ch, p->split_ky, p->split_kx, count, set->taps);
        book_taps(p, set->taps, set->books);
    } else {
        make_taps(p, geometry, p->col_ch, p->col_ky, p->col_kx, count, set->taps);
    }
    return set;
}

/* The plan's taps for this geometry (made on first sight); *owned is set when the caller must free them (every
 * slot taken by other stride patterns). NULL when out of memory. */
static tc_taps *taps_for(tc_plan *p, const tc_input *geometry, int *owned) {
    *owned = 0;
    for (int slot = 0; slot < TAP_SETS; slot++) {
        tc_taps *set = atomic_load(&p->taps[slot]);
        if (!set) {
            tc_taps *made = make_tap_set(p, geometry);
            if (!made) return NULL;
            void *expected = NULL;
            if (atomic_compare_exchange_strong(&p->taps[slot], &expected, made)) return made;
            free_taps(made); /* another thread claimed the slot first: look at what it put there */
            set = expected;
        }
        if (set->sc == geometry->sc && set->sh == geometry->sh && set->sw == geometry->sw) return set;
    }
    *owned = 1;
    return make_tap_set(p, geometry);
}

/* How a call of `rows` rows in `tiles` tiles shares the work: *threads lowered to 1 for small work (waking a second
 * thread costs more), and the number of output chunks per tile returned: with fewer tiles than threads, the outputs
 * are split between threads (when `split_outputs`). */
static int split_work(const tc_plan *p, int64_t rows, int64_t tiles, int split_outputs, int *threads) {
    if (*threads < 1 || (double)rows * p->total * p->d.out_features < SMALL_WORK) *threads = 1;
    int chunks = !split_outputs || tiles >= *threads ? 1 : *threads;
    return chunks > p->d.out_features ? p->d.out_features : chunks;
}

static int run(const tc_plan *p, const float *x, int64_t n_images, int64_t h, int64_t w, const int64_t *strides,
               float *out, int32_t *codes_out, int threads) {
    tc_call call = {{x, strides[0], strides[1], strides[2], strides[3], h, w, 0, 0, 0}, NULL, NULL, NULL, NULL};
    tc_input *in = &call.in;
    in->ho = (h + 2 * p->d.py - p->d.dy * (p->d.kh - 1) - 1) / p->d.sy + 1;
    in->wo = (w + 2 * p->d.px - p->d.dx * (p->d.kw - 1) - 1) / p->d.sx + 1;
    in->rows = n_images * in->ho * in->wo;
    if (in->ho <= 0 || in->wo <= 0) return 1;
    if (threads < 1) threads = 1;
    int isa = tc_isa(), lanes = use_lanes(p, isa, n_images);
    int64_t columns = (int64_t)p->total * p->d.width, hw_out = in->ho * in->wo;
    int64_t channels = p->d.in_channels, blocks = (n_images + 15) / 16;
    int64_t pairs = blocks * hw_out; /* image lanes: (block of 16 images, output position) pairs, TILE / 16 a tile */
    int64_t tiles = lanes ? (pairs + TILE / 16 - 1) / (TILE / 16) : (in->rows + TILE - 1) / TILE;
    tc_input geometry = *in; /* where taps are: the input's strides, or the lane layout's (in units of 16) */
    if (lanes) {
        geometry.sc = h * w;
        geometry.sh = w;
        geometry.sw = 1;
    }
    int owned;
    tc_taps *set = taps_for((tc_plan *)p, &geometry, &owned); /* the cache is the plan's only mutable part */
    if (!set) return 2;
    if (p->d.encoder == 1) {
        call.split = set->taps;
        if (!lanes && isa == ISA_AVX512 && in->rows <= BOOK_ROWS) call.books = set->books;
    } else {
        call.column = set->taps;
    }
#if TC_X86
    if (lanes) {
        call.lanes = scratch(SCRATCH_LANES, sizeof(float) * (size_t)(blocks * channels * h * w * 16));
        if (!call.lanes) {
            if (owned) free_taps(set);
            return 2;
        }
        to_lanes(in, n_images, channels, call.lanes, threads);
    }
#endif
    int m_total = p->d.out_features;
    int chunks = split_work(p, in->rows, tiles, !codes_out, &threads);
    int64_t items = tiles * chunks;
    int failed = 0, per = p->per_group;
#pragma omp parallel num_threads(threads > items ? (int)items : threads) if (threads > 1 && items > 1)
    {
        uint16_t *codes = scratch(SCRATCH_CODES, sizeof(uint16_t) * (size_t)p->total * TILE);
        float *xrow = scratch(SCRATCH_ROW, sizeof(float) * ((size_t)columns + (size_t)p->d.centroids));
        void *acc = scratch(SCRATCH_ACC, sizeof(float) * (size_t)(per > 0 ? per : 1));
        tc_tile *tile = scratch(SCRATCH_TILE, sizeof(tc_tile));
        if (!codes || !xrow || !acc || !tile) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < items; item++) {
                int chunk = (int)(item % chunks);
                int64_t index = item / chunks;
                if (lanes) {
                    int64_t first = index * (TILE / 16);
                    int count = pairs - first < TILE / 16 ? (int)(pairs - first) : TILE / 16;
                    fill_lane_tile(p, in, n_images, channels, first, count, tile);
                } else {
                    int64_t r0 = index * TILE;
                    fill_tile(p, in, r0, in->rows - r0 < TILE ? (int)(in->rows - r0) : TILE, tile);
                }
                encode_tile(p, &call, isa, tile, codes, xrow, xrow + columns);
                if (codes_out) {
                    for (int i = 0; i < tile->n; i++)
                        if (tile->row[i] >= 0)
                            for (int c = 0; c < p->total; c++)
                                codes_out[tile->row[i] * p->total + c] = codes[(int64_t)c * TILE + i];
                    continue;
                }
                int m0 = (int)((int64_t)m_total * chunk / chunks), m1 = (int)((int64_t)m_total * (chunk + 1) / chunks);
                lookup_tile(p, isa, tile, codes, m0, m1, out, acc);
            }
        }
    }
    if (owned) free_taps(set);
    return failed ? 2 : 0;
}

int tc_forward(const void *handle, const float *x, int64_t n, int64_t h, int64_t w, int64_t sn, int64_t sc,
               int64_t sh, int64_t sw, float *out, int threads) {
    int64_t strides[4] = {sn, sc, sh, sw};
    return run((const tc_plan *)handle, x, n, h, w, strides, out, NULL, threads);
}

/* codes: (N * H_out * W_out, C') int32, the codes the encoder picked (for tests). */
int tc_encode(const void *handle, const float *x, int64_t n, int64_t h, int64_t w, int64_t sn, int64_t sc,
              int64_t sh, int64_t sw, int32_t *codes, int threads) {
    int64_t strides[4] = {sn, sc, sh, sw};
    return run((const tc_plan *)handle, x, n, h, w, strides, NULL, codes, threads);
}

/* The lookups alone, from codes (rows, C') int32 another encoder picked (e.g. PyTorch's, when its distances are the
 * faster ones): out rows (rows, M) float32. Returns 0 on success. */
int tc_lookup(const void *handle, const int32_t *codes_in, int64_t rows, float *out, int threads) {
    const tc_plan *p = (const tc_plan *)handle;
    int isa = tc_isa(), m_total = p->d.out_features, per = p->per_group;
    int64_t tiles = (rows + TILE - 1) / TILE;
    int chunks = split_work(p, rows, tiles, 1, &threads);
    int64_t items = tiles * chunks;
    int failed = 0;
#pragma omp parallel num_threads(threads > items ? (int)items : threads) if (threads > 1 && items > 1)
    {
        uint16_t *codes = scratch(SCRATCH_CODES, sizeof(uint16_t) * (size_t)p->total * TILE);
        void *acc = scratch(SCRATCH_ACC, sizeof(float) * (size_t)(per > 0 ? per : 1));
        tc_tile *tile = scratch(SCRATCH_TILE, sizeof(tc_tile));
        if (!codes || !acc || !tile) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < items; item++) {
                int chunk = (int)(item % chunks);
                int64_t r0 = item / chunks * TILE;
                int n = rows - r0 < TILE ? (int)(rows - r0) : TILE;
                tile->n = n;
                for (int i = 0; i < TILE; i++) tile->row[i] = i < n ? r0 + i : -1;
                for (int c = 0; c < p->total; c++)
                    for (int i = 0; i < TILE; i++)
                        codes[(int64_t)c * TILE + i] = i < n ? (uint16_t)codes_in[(r0 + i) * p->total + c] : 0;
                int m0 = (int)((int64_t)m_total * chunk / chunks), m1 = (int)((int64_t)m_total * (chunk + 1) / chunks);
                lookup_tile(p, isa, tile, codes, m0, m1, out, acc);
            }
        }
    }
    return failed ? 2 : 0;
}

/* rows (N, HW, M) -> planes (N, M, HW): the outputs in the NCHW layout of runtimes other than PyTorch (the
 * onnxruntime operator), in blocks of 16 x 16. Returns 0. */
int tc_rows_to_planes(const float *rows, int64_t n, int64_t hw, int64_t m, float *out, int threads) {
    int64_t pblocks = (hw + 15) / 16, mblocks = (m + 15) / 16, per_image = pblocks * mblocks, items = n * per_image;
    int isa = tc_isa();
    (void)isa;
    if ((double)n * hw * m < SMALL_WORK / 4) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t item = 0; item < items; item++) {
        int64_t image = item / per_image, pb = item % per_image / mblocks, mb = item % mblocks;
        int64_t p0 = pb * 16, m0 = mb * 16;
        int np = hw - p0 < 16 ? (int)(hw - p0) : 16, nm = m - m0 < 16 ? (int)(m - m0) : 16;
        const float *src = rows + (image * hw + p0) * m + m0;
        float *dst = out + (image * m + m0) * hw + p0;
#if TC_X86
        if (isa == ISA_AVX512) {
            planes_block(src, m, dst, hw, np, nm);
            continue;
        }
#endif
        for (int i = 0; i < np; i++)
            for (int j = 0; j < nm; j++) dst[j * hw + i] = src[i * m + j];
    }
    return 0;
}
