/* The table layer as an onnxruntime custom operator: op "TableLayer" in domain "tabconv", running the same
 * kernels as PyTorch's native path (lookup.c). Load it with SessionOptions.register_custom_ops_library(path).
 *
 * Inputs (every array a constant initializer; an unused one is an empty tensor):
 *   0 X                  float (N, C_in, H, W) for a conv, (N, D) for a linear layer
 *   1-3 column_channel, column_ky, column_kx   int32 (C' * s): where each padded im2col column reads the input
 *   4 split_dims         int64 (C', depth)      hash tree
 *   5 thresholds         float (C', K - 1)      hash tree
 *   6 prototypes         float (C', K, s)       exhaustive encoder
 *   7 tables             int8 or float (C', K, M / G)
 *   8 scale, 9 bias      float (M)              int8 tables: y = scale * sum + bias
 * Attributes (int): in_channels kh kw sy sx py px dy dx groups codebooks centroids width out_features encoder
 * depth lut conv. Output: float (N, M, H_out, W_out) or (N, M).
 *
 * Written against onnxruntime's C API without its header: the API is a table of function pointers whose slots
 * never move (append-only across versions), so the few slots used are named below by index. The operator asks for
 * API version 16 (onnxruntime >= 1.16) and fills OrtCustomOp up to the fields that version reads. */
#include "lookup.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ORT_API_VERSION_USED 16
typedef void OrtStatus; /* opaque onnxruntime objects */
typedef void OrtKernelInfo;
typedef void OrtKernelContext;
typedef void OrtValue;
typedef void OrtTypeAndShape;

/* onnxruntime's OrtApi slots used here */
enum {
    API_CREATE_STATUS = 0,
    API_CREATE_CUSTOM_OP_DOMAIN = 26,
    API_CUSTOM_OP_DOMAIN_ADD = 27,
    API_ADD_CUSTOM_OP_DOMAIN = 28,
    API_GET_TENSOR_MUTABLE_DATA = 51,
    API_GET_TENSOR_ELEMENT_TYPE = 60,
    API_GET_DIMENSIONS_COUNT = 61,
    API_GET_DIMENSIONS = 62,
    API_GET_TENSOR_SHAPE_ELEMENT_COUNT = 64,
    API_GET_TENSOR_TYPE_AND_SHAPE = 65,
    API_KERNEL_INFO_GET_ATTRIBUTE_INT64 = 86,
    API_KERNEL_CONTEXT_GET_INPUT = 90,
    API_KERNEL_CONTEXT_GET_OUTPUT = 91,
    API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    API_RELEASE_CUSTOM_OP_DOMAIN = 101,
    API_KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR = 249,
};
enum { TYPE_UNDEFINED = 0, TYPE_FLOAT = 1, TYPE_INT8 = 3, TYPE_INT32 = 6, TYPE_INT64 = 7 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
#define INPUTS 10

typedef const void *const *ort_api;
typedef struct {
    ort_api (*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} ort_api_base;

/* onnxruntime's OrtCustomOp up to KernelComputeV2 (the fields version 16 reads), then unread slots left NULL. */
typedef struct {
    uint32_t version;
    void *(*CreateKernel)(const void *op, ort_api api, const OrtKernelInfo *info);
    const char *(*GetName)(const void *op);
    const char *(*GetExecutionProviderType)(const void *op);
    int (*GetInputType)(const void *op, size_t index);
    size_t (*GetInputTypeCount)(const void *op);
    int (*GetOutputType)(const void *op, size_t index);
    size_t (*GetOutputTypeCount)(const void *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const void *op, size_t index);
    int (*GetOutputCharacteristic)(const void *op, size_t index);
    int (*GetInputMemoryType)(const void *op, size_t index);
    int (*GetVariadicInputMinArity)(const void *op);
    int (*GetVariadicInputHomogeneity)(const void *op);
    int (*GetVariadicOutputMinArity)(const void *op);
    int (*GetVariadicOutputHomogeneity)(const void *op);
    OrtStatus *(*CreateKernelV2)(const void *op, ort_api api, const OrtKernelInfo *info, void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
    void *unread[7];
} ort_custom_op;

typedef struct {
    ort_api api;
    void *plan; /* made once, from the constant inputs, when the kernel is created */
    int conv;
    int64_t in_channels, out_features, kh, kw, sy, sx, py, px, dy, dx;
} table_kernel;

#define CALL(api, slot, type) ((type)(api)[slot])

static OrtStatus *fail(ort_api api, int code, const char *message) {
    return CALL(api, API_CREATE_STATUS, OrtStatus *(*)(int, const char *))(code, message);
}

/* A status from onnxruntime itself, handed on; NULL when `status` is NULL. */
#define CHECK(expr)                          \
    do {                                     \
        OrtStatus *status_ = (expr);         \
        if (status_) return status_;         \
    } while (0)

static OrtStatus *attribute(ort_api api, const OrtKernelInfo *info, const char *name, int64_t *value) {
    return CALL(api, API_KERNEL_INFO_GET_ATTRIBUTE_INT64, OrtStatus *(*)(const OrtKernelInfo *, const char *,
                                                                         int64_t *))(info, name, value);
}

/* An input's element type, element count and (up to 4) dimensions. */
static OrtStatus *describe(ort_api api, const OrtValue *value, int *type, size_t *count, int64_t *dims,
                           size_t *rank) {
    OrtTypeAndShape *shape;
    CHECK(CALL(api, API_GET_TENSOR_TYPE_AND_SHAPE, OrtStatus *(*)(const OrtValue *, OrtTypeAndShape **))(value, &shape));
    OrtStatus *status = CALL(api, API_GET_TENSOR_ELEMENT_TYPE, OrtStatus *(*)(const OrtTypeAndShape *, int *))(shape, type);
    if (!status)
        status = CALL(api, API_GET_TENSOR_SHAPE_ELEMENT_COUNT, OrtStatus *(*)(const OrtTypeAndShape *, size_t *))(shape, count);
    if (!status)
        status = CALL(api, API_GET_DIMENSIONS_COUNT, OrtStatus *(*)(const OrtTypeAndShape *, size_t *))(shape, rank);
    if (!status && *rank <= 4)
        status = CALL(api, API_GET_DIMENSIONS, OrtStatus *(*)(const OrtTypeAndShape *, int64_t *, size_t))(shape, dims, *rank);
    CALL(api, API_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, void (*)(OrtTypeAndShape *))(shape);
    return status;
}

static OrtStatus *data_of(ort_api api, const OrtValue *value, void **data) {
    return CALL(api, API_GET_TENSOR_MUTABLE_DATA, OrtStatus *(*)(const OrtValue *, void **))(value, data);
}

static const char *const ATTRIBUTES[] = {"in_channels", "kh", "kw", "sy", "sx", "py", "px", "dy", "dx", "groups",
                                         "codebooks", "centroids", "width", "out_features", "encoder", "depth",
                                         "lut"};
static const int EXPECTED[INPUTS] = {TYPE_FLOAT, TYPE_INT32, TYPE_INT32, TYPE_INT32, TYPE_INT64,
                                     TYPE_FLOAT, TYPE_FLOAT, TYPE_UNDEFINED, TYPE_FLOAT, TYPE_FLOAT};

static OrtStatus *make_plan(ort_api api, const OrtKernelInfo *info, table_kernel *k) {
    int64_t values[17], conv;
    for (int i = 0; i < 17; i++) CHECK(attribute(api, info, ATTRIBUTES[i], &values[i]));
    CHECK(attribute(api, info, "conv", &conv));
    tc_desc d = {(int32_t)values[0], (int32_t)values[1], (int32_t)values[2], (int32_t)values[3],
                 (int32_t)values[4], (int32_t)values[5], (int32_t)values[6], (int32_t)values[7],
                 (int32_t)values[8], (int32_t)values[9], (int32_t)values[10], (int32_t)values[11],
                 (int32_t)values[12], (int32_t)values[13], (int32_t)values[14], (int32_t)values[15],
                 (int32_t)values[16], NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL}; /* ATTRIBUTES order */
    const void *arrays[INPUTS] = {NULL};
    for (int i = 1; i < INPUTS; i++) {
        int constant = 0, type = 0;
        const OrtValue *value = NULL;
        size_t count = 0, rank = 0;
        int64_t dims[4];
        CHECK(CALL(api, API_KERNEL_INFO_GET_CONSTANT_INPUT_TENSOR,
                   OrtStatus *(*)(const OrtKernelInfo *, size_t, int *, const OrtValue **))(info, i, &constant, &value));
        if (!constant || !value) return fail(api, ORT_INVALID_ARGUMENT, "tabconv TableLayer: every input after X must be a constant initializer");
        CHECK(describe(api, value, &type, &count, dims, &rank));
        int wanted = i == 7 ? (d.lut == 1 ? TYPE_INT8 : TYPE_FLOAT) : EXPECTED[i];
        if (count && type != wanted) return fail(api, ORT_INVALID_ARGUMENT, "tabconv TableLayer: an input has the wrong element type");
        void *data = NULL;
        if (count) CHECK(data_of(api, value, &data));
        arrays[i] = data;
    }
    d.column_channel = arrays[1], d.column_ky = arrays[2], d.column_kx = arrays[3];
    d.split_dims = arrays[4], d.thresholds = arrays[5], d.prototypes = arrays[6];
    d.tables = arrays[7], d.scale = arrays[8], d.bias = arrays[9];
    if (!d.column_channel || !d.tables || (d.encoder == 1 ? !d.split_dims || !d.thresholds : !d.prototypes) ||
        (d.lut == 1 && (!d.scale || !d.bias)))
        return fail(api, ORT_INVALID_ARGUMENT, "tabconv TableLayer: an input the layer needs is empty");
    k->plan = tc_plan_new(&d);
    if (!k->plan) return fail(api, ORT_FAIL, "tabconv TableLayer: out of memory making the layer's plan");
    k->conv = conv != 0;
    k->in_channels = d.in_channels, k->out_features = d.out_features;
    k->kh = d.kh, k->kw = d.kw, k->sy = d.sy, k->sx = d.sx, k->py = d.py, k->px = d.px, k->dy = d.dy, k->dx = d.dx;
    return NULL;
}

static void destroy(void *handle) {
    table_kernel *k = (table_kernel *)handle;
    if (!k) return;
    tc_plan_free(k->plan);
    free(k);
}

static OrtStatus *create(const void *op, ort_api api, const OrtKernelInfo *info, void **kernel) {
    (void)op;
    table_kernel *k = calloc(1, sizeof(table_kernel));
    if (!k) return fail(api, ORT_FAIL, "tabconv TableLayer: out of memory");
    k->api = api;
    OrtStatus *status = make_plan(api, info, k);
    if (status) {
        destroy(k);
        return status;
    }
    *kernel = k;
    return NULL;
}

static void *scratch_rows(size_t bytes) { /* per thread, kept between calls: outputs before the NCHW relayout */
    static _Thread_local void *buffer;
    static _Thread_local size_t size;
    if (bytes > size) {
        free(buffer);
        buffer = malloc(bytes);
        size = buffer ? bytes : 0;
    }
    return buffer;
}

static OrtStatus *compute(void *handle, OrtKernelContext *context) {
    table_kernel *k = (table_kernel *)handle;
    ort_api api = k->api;
    const OrtValue *input;
    CHECK(CALL(api, API_KERNEL_CONTEXT_GET_INPUT, OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(context, 0, &input));
    int type;
    size_t count, rank;
    int64_t dims[4];
    CHECK(describe(api, input, &type, &count, dims, &rank));
    if (type != TYPE_FLOAT || rank != (k->conv ? 4u : 2u) || dims[1] != k->in_channels)
        return fail(api, ORT_INVALID_ARGUMENT, "tabconv TableLayer: X must be float (N, C_in, H, W) for a conv, (N, D) for a linear layer");
    void *x;
    CHECK(data_of(api, input, &x));
    int64_t n = dims[0], h = k->conv ? dims[2] : 1, w = k->conv ? dims[3] : 1;
    int64_t ho = (h + 2 * k->py - k->dy * (k->kh - 1) - 1) / k->sy + 1;
    int64_t wo = (w + 2 * k->px - k->dx * (k->kw - 1) - 1) / k->sx + 1;
    if (ho <= 0 || wo <= 0) return fail(api, ORT_INVALID_ARGUMENT, "tabconv TableLayer: X is smaller than the kernel");
    int64_t out_dims[4] = {n, k->out_features, ho, wo};
    OrtValue *output;
    CHECK(CALL(api, API_KERNEL_CONTEXT_GET_OUTPUT, OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t,
                                                                  OrtValue **))(context, 0, out_dims, rank, &output));
    void *y;
    CHECK(data_of(api, output, &y));
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    int rc;
    if (!k->conv) {
        rc = tc_forward(k->plan, x, n, 1, 1, dims[1], 1, 0, 0, y, threads);
    } else {
        float *rows = scratch_rows(sizeof(float) * (size_t)(n * ho * wo * k->out_features));
        if (!rows) return fail(api, ORT_FAIL, "tabconv TableLayer: out of memory");
        rc = tc_forward(k->plan, x, n, h, w, k->in_channels * h * w, h * w, w, 1, rows, threads);
        if (!rc) rc = tc_rows_to_planes(rows, n, ho * wo, k->out_features, y, threads);
    }
    if (rc) return fail(api, ORT_FAIL, "tabconv TableLayer: the native kernel failed");
    return NULL;
}

static const char *name(const void *op) { (void)op; return "TableLayer"; }
static const char *provider(const void *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const void *op, size_t index) { (void)op; return index < INPUTS ? EXPECTED[index] : TYPE_UNDEFINED; }
static size_t input_count(const void *op) { (void)op; return INPUTS; }
static int output_type(const void *op, size_t index) { (void)op; (void)index; return TYPE_FLOAT; }
static size_t output_count(const void *op) { (void)op; return 1; }
static int required(const void *op, size_t index) { (void)op; (void)index; return 0; }
static int memory_default(const void *op, size_t index) { (void)op; (void)index; return 0; }
static int one(const void *op) { (void)op; return 1; }

static ort_custom_op TABLE_LAYER = {
    ORT_API_VERSION_USED, NULL, name, provider, input_type, input_count, output_type, output_count, NULL, destroy,
    required, required, memory_default, one, one, one, one, create, compute, {NULL}};

/* The entry point onnxruntime calls when the library is registered with a session's options. */
OrtStatus *RegisterCustomOps(void *options, const ort_api_base *base) {
    ort_api api = base->GetApi(ORT_API_VERSION_USED);
    if (!api) {
        fprintf(stderr, "tabconv: this onnxruntime (%s) predates API version %d (onnxruntime 1.16)\n",
                base->GetVersionString(), ORT_API_VERSION_USED);
        return NULL; /* without an API there is no way to make a status: the model's TableLayer nodes then fail */
    }
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static void *domain; /* one for every session, made once; it must outlive them all: never released */
    OrtStatus *status = NULL;
    pthread_mutex_lock(&lock);
    if (!domain) {
        void *made = NULL;
        status = CALL(api, API_CREATE_CUSTOM_OP_DOMAIN, OrtStatus *(*)(const char *, void **))("tabconv", &made);
        if (!status)
            status = CALL(api, API_CUSTOM_OP_DOMAIN_ADD, OrtStatus *(*)(void *, const void *))(made, &TABLE_LAYER);
        if (!status) domain = made;
        else if (made) CALL(api, API_RELEASE_CUSTOM_OP_DOMAIN, void (*)(void *))(made);
    }
    pthread_mutex_unlock(&lock);
    if (status) return status;
    return CALL(api, API_ADD_CUSTOM_OP_DOMAIN, OrtStatus *(*)(void *, void *))(options, domain);
}
