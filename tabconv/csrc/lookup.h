/* The native table-layer kernels' interface (lookup.c): a layer's plan, made once from the quantizer's arrays,
 * then run on inputs. Used by ctypes (tabconv/native.py) and by the onnxruntime operator (ort_ops.c). */
#ifndef TABCONV_LOOKUP_H
#define TABCONV_LOOKUP_H
#include <stdint.h>

typedef struct {
    int32_t in_channels, kh, kw, sy, sx, py, px, dy, dx;
    int32_t groups, codebooks, centroids, width, out_features;
    int32_t encoder; /* 0 exhaustive, 1 tree */
    int32_t depth;
    int32_t lut; /* 0 float32, 1 int8 */
    const int32_t *column_channel, *column_ky, *column_kx; /* per padded column of a group-0-relative row */
    const int64_t *split_dims;                              /* (C', depth) */
    const float *thresholds;                                /* (C', K - 1) */
    const float *prototypes;                                /* (C', K, s) */
    const void *tables;                                     /* (C', K, M / G) */
    const float *scale, *bias;                              /* (M) */
} tc_desc;

/* A plan owns copies of every array it needs: the desc's arrays may be freed once it returns. NULL: no memory. */
void *tc_plan_new(const tc_desc *d);
void tc_plan_free(void *handle);
/* x: (N, C_in, H, W) at element strides (sn, sc, sh, sw); out: rows (N * H_out * W_out, M) float32, i.e.
 * (N, H_out, W_out, M) channels-last. Returns 0 on success. */
int tc_forward(const void *handle, const float *x, int64_t n, int64_t h, int64_t w, int64_t sn, int64_t sc,
               int64_t sh, int64_t sw, float *out, int threads);
int tc_encode(const void *handle, const float *x, int64_t n, int64_t h, int64_t w, int64_t sn, int64_t sc,
              int64_t sh, int64_t sw, int32_t *codes, int threads);
int tc_lookup(const void *handle, const int32_t *codes_in, int64_t rows, float *out, int threads);
/* rows (N, HW, M) -> planes (N, M, HW) (NCHW). */
int tc_rows_to_planes(const float *rows, int64_t n, int64_t hw, int64_t m, float *out, int threads);
int tc_isa(void);
int tc_force_isa(int isa);
int tc_lookup_path(const void *handle, int rows);
int tc_version(void);
#endif
