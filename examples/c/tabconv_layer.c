/*
 * tabconv_layer.c - run ONE exported table layer of a TabConv export, in portable C99, no dependencies.
 *
 *   cc -O2 -std=c99 -o tabconv_layer examples/c/tabconv_layer.c -lm
 *   ./tabconv_layer EXPORT_DIR LAYER_NAME INPUT.npy OUTPUT.npy
 *
 * EXPORT_DIR holds manifest.json and tables.npz as written by `python -m tabconv export ... --format npz`.
 * INPUT.npy is float32 (N, C, H, W) for a conv layer, (N, D) for a linear layer; OUTPUT.npy is written as
 * float32 (N, M, H_out, W_out) or (N, M). Everything follows docs/export-format.md:
 *
 *   1. rows: one per input vector (linear) or output position (conv, im2col columns in (c_in, ky, kx) order),
 *      zero-padded from D to D_pad = C * ceil(D / C) columns, cut into C subspaces of s = D_pad / C columns;
 *   2. encoding: per subspace the nearest prototype (exhaustive: argmin ||p||^2 - 2 <x, p>, ties to the
 *      smallest k) or the leaf of a complete binary tree (tree: one split dimension per level);
 *   3. lookup: the sum over codebooks of the picked table rows, float32 / float16 (widened) or int8 (summed as
 *      int32, then dequantised once per output; one scale per layer or per output, one offset per codebook or
 *      per codebook and output);
 *   4. the bias (and any folded batch norm) is already in the tables: nothing else is added.
 *
 * tables.npz is read directly (zip central directory, stored entries, CRC-32 checked), and every .npy header
 * (versions 1 to 3, little-endian '<f4', '<f2', '|i1', '<i8', C order) is parsed here. Grouped convolutions
 * (groups > 1) are refused: the npz export writes ungrouped tables only. Every error is one line on stderr,
 * naming the file or value at fault, and exit status 1; OUTPUT.npy is then left untouched.
 */

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIMS 8
#define MAX_JSON_DEPTH 64

/* -- errors and memory --------------------------------------------------------------------------------- */

static void die(const char *fmt, ...)
{
    char line[1024];
    size_t i;
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    for (i = 0; line[i]; i++) /* one line of text, whatever a name or a file holds */
        if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
            line[i] = '?';
    fprintf(stderr, "tabconv_layer: %s\n", line);
    exit(1);
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        die("out of memory (%lu bytes)", (unsigned long)bytes);
    return p;
}

static void *xrealloc(void *old, size_t bytes)
{
    void *p = realloc(old, bytes ? bytes : 1);
    if (!p)
        die("out of memory (%lu bytes)", (unsigned long)bytes);
    return p;
}

/* a * b, refused when it does not fit a size_t */
static size_t mul(size_t a, size_t b, const char *what)
{
    if (a && b > (size_t)-1 / a)
        die("%s: size overflow", what);
    return a * b;
}

static char *join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir);
    char *path = xmalloc(n + strlen(name) + 2);
    strcpy(path, dir);
    if (n && dir[n - 1] != '/' && dir[n - 1] != '\\')
        strcat(path, "/");
    strcat(path, name);
    return path;
}

/* -- little-endian decoding (the file formats are little-endian whatever this machine is) ---------------- */

static uint32_t le16(const unsigned char *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8; }

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static float f32_from_bits(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE half -> float: exact (every half is a float) */
static float half_to_float(uint32_t h)
{
    uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    float v;
    if (exponent == 0)
        v = ldexpf((float)mantissa, -24); /* zero and subnormals */
    else if (exponent == 31)
        v = mantissa ? NAN : INFINITY;
    else
        v = ldexpf((float)(mantissa | 0x400), (int)exponent - 25);
    return (h & 0x8000) ? -v : v;
}

/* -- files --------------------------------------------------------------------------------------------- */

static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    unsigned char *data;
    size_t cap = 1 << 16, n = 0, got;
    if (!f)
        die("%s: cannot open the file", path);
    data = xmalloc(cap);
    while ((got = fread(data + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap)
            data = xrealloc(data, cap = mul(cap, 2, path));
    }
    if (ferror(f))
        die("%s: read error", path);
    fclose(f);
    *size = n;
    return data;
}

static void read_at(FILE *f, const char *path, uint64_t offset, void *buffer, size_t bytes)
{
    if (offset > (uint64_t)LONG_MAX || fseek(f, (long)offset, SEEK_SET) != 0)
        die("%s: cannot seek to byte %lu (truncated file?)", path, (unsigned long)offset);
    if (fread(buffer, 1, bytes, f) != bytes)
        die("%s: truncated file (wanted %lu bytes at byte %lu)", path, (unsigned long)bytes, (unsigned long)offset);
}

/* -- a small JSON reader (the whole document into a tree; enough for manifest.json) -------------------- */

enum { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct JVal {
    int type;
    double num;
    char *str;          /* J_STR */
    size_t n, cap;      /* J_ARR, J_OBJ: items (and keys for an object) */
    struct JVal *items;
    char **keys;
} JVal;

typedef struct {
    const char *s;
    size_t len, pos;
    const char *file;
} JParser;

static void jfail(JParser *p, const char *what)
{
    die("%s: not valid JSON at byte %lu (%s)", p->file, (unsigned long)p->pos, what);
}

static void jspace(JParser *p)
{
    while (p->pos < p->len && strchr(" \t\r\n", p->s[p->pos]) && p->s[p->pos])
        p->pos++;
}

static int jpeek(JParser *p) { return p->pos < p->len ? (unsigned char)p->s[p->pos] : -1; }

static unsigned jhex4(JParser *p)
{
    unsigned value = 0;
    int i;
    for (i = 0; i < 4; i++) {
        int c = jpeek(p);
        value <<= 4;
        if (c >= '0' && c <= '9')
            value |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            value |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            value |= (unsigned)(c - 'A' + 10);
        else
            jfail(p, "bad \\u escape");
        p->pos++;
    }
    return value;
}

static char *jstring(JParser *p)
{
    size_t cap = 32, n = 0;
    char *out = xmalloc(cap);
    p->pos++; /* the opening quote */
    for (;;) {
        int c = jpeek(p);
        unsigned long code;
        if (c < 0)
            jfail(p, "unterminated string");
        p->pos++;
        if (c == '"')
            break;
        if (n + 5 >= cap)
            out = xrealloc(out, cap *= 2);
        if (c != '\\') {
            out[n++] = (char)c;
            continue;
        }
        c = jpeek(p);
        p->pos++;
        switch (c) {
        case '"': out[n++] = '"'; continue;
        case '\\': out[n++] = '\\'; continue;
        case '/': out[n++] = '/'; continue;
        case 'b': out[n++] = '\b'; continue;
        case 'f': out[n++] = '\f'; continue;
        case 'n': out[n++] = '\n'; continue;
        case 'r': out[n++] = '\r'; continue;
        case 't': out[n++] = '\t'; continue;
        case 'u': break;
        default: jfail(p, "bad escape");
        }
        code = jhex4(p);
        if (code >= 0xD800 && code < 0xDC00 && jpeek(p) == '\\' && p->pos + 1 < p->len && p->s[p->pos + 1] == 'u') {
            unsigned long low;
            p->pos += 2;
            low = jhex4(p);
            code = (low >= 0xDC00 && low < 0xE000) ? 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00) : 0xFFFD;
        }
        if (code < 0x80) {
            out[n++] = (char)code;
        } else if (code < 0x800) {
            out[n++] = (char)(0xC0 | code >> 6);
            out[n++] = (char)(0x80 | (code & 0x3F));
        } else if (code < 0x10000) {
            out[n++] = (char)(0xE0 | code >> 12);
            out[n++] = (char)(0x80 | ((code >> 6) & 0x3F));
            out[n++] = (char)(0x80 | (code & 0x3F));
        } else {
            out[n++] = (char)(0xF0 | code >> 18);
            out[n++] = (char)(0x80 | ((code >> 12) & 0x3F));
            out[n++] = (char)(0x80 | ((code >> 6) & 0x3F));
            out[n++] = (char)(0x80 | (code & 0x3F));
        }
    }
    out[n] = '\0';
    return out;
}

static void jvalue(JParser *p, JVal *v, int depth);

static JVal *jappend(JVal *v)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 8;
        v->items = xrealloc(v->items, mul(v->cap, sizeof *v->items, "manifest"));
        if (v->type == J_OBJ)
            v->keys = xrealloc(v->keys, mul(v->cap, sizeof *v->keys, "manifest"));
    }
    memset(&v->items[v->n], 0, sizeof v->items[v->n]);
    return &v->items[v->n++];
}

static void jcontainer(JParser *p, JVal *v, int depth, int close)
{
    p->pos++; /* '[' or '{' */
    jspace(p);
    if (jpeek(p) == close) {
        p->pos++;
        return;
    }
    for (;;) {
        char *key = NULL;
        jspace(p);
        if (close == '}') {
            if (jpeek(p) != '"')
                jfail(p, "expected a key");
            key = jstring(p);
            jspace(p);
            if (jpeek(p) != ':')
                jfail(p, "expected ':'");
            p->pos++;
        }
        {
            JVal *item = jappend(v);
            if (key)
                v->keys[v->n - 1] = key;
            jvalue(p, item, depth + 1);
        }
        jspace(p);
        if (jpeek(p) == ',') {
            p->pos++;
            continue;
        }
        if (jpeek(p) != close)
            jfail(p, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
        p->pos++;
        return;
    }
}

static void jvalue(JParser *p, JVal *v, int depth)
{
    int c;
    if (depth > MAX_JSON_DEPTH)
        jfail(p, "nested too deeply");
    jspace(p);
    c = jpeek(p);
    if (c == '{') {
        v->type = J_OBJ;
        jcontainer(p, v, depth, '}');
    } else if (c == '[') {
        v->type = J_ARR;
        jcontainer(p, v, depth, ']');
    } else if (c == '"') {
        v->type = J_STR;
        v->str = jstring(p);
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        char text[64], *end;
        size_t n = 0;
        while (p->pos < p->len && strchr("+-0123456789.eE", p->s[p->pos]) && p->s[p->pos] && n < sizeof text - 1)
            text[n++] = p->s[p->pos++];
        text[n] = '\0';
        v->type = J_NUM;
        v->num = strtod(text, &end);
        if (*end)
            jfail(p, "bad number");
    } else if (p->len - p->pos >= 4 && !strncmp(p->s + p->pos, "true", 4)) {
        v->type = J_TRUE;
        p->pos += 4;
    } else if (p->len - p->pos >= 5 && !strncmp(p->s + p->pos, "false", 5)) {
        v->type = J_FALSE;
        p->pos += 5;
    } else if (p->len - p->pos >= 4 && !strncmp(p->s + p->pos, "null", 4)) {
        v->type = J_NULL;
        p->pos += 4;
    } else {
        jfail(p, "unexpected character");
    }
}

static const JVal *jget(const JVal *obj, const char *key)
{
    size_t i;
    if (!obj || obj->type != J_OBJ)
        return NULL;
    for (i = 0; i < obj->n; i++)
        if (!strcmp(obj->keys[i], key))
            return &obj->items[i];
    return NULL;
}

/* The layer being read, for error messages: "<manifest>: layer '<name>': ..." */
static const char *g_manifest = "manifest.json", *g_layer = "";

static long jint(const JVal *v, const char *what)
{
    if (!v || v->type != J_NUM || v->num != floor(v->num) || fabs(v->num) > 2147483647.0)
        die("%s: layer '%s': \"%s\" is missing or not an integer", g_manifest, g_layer, what);
    return (long)v->num;
}

static long field_int(const JVal *layer, const char *key, long min)
{
    long value = jint(jget(layer, key), key);
    if (value < min)
        die("%s: layer '%s': \"%s\" is %ld, expected at least %ld", g_manifest, g_layer, key, value, min);
    return value;
}

static const char *field_str(const JVal *layer, const char *key)
{
    const JVal *v = jget(layer, key);
    if (!v || v->type != J_STR)
        die("%s: layer '%s': \"%s\" is missing or not a string", g_manifest, g_layer, key);
    return v->str;
}

/* an integer list such as "kernel_size": [3, 3]; returns its length (at most `max`) */
static int field_ints(const JVal *layer, const char *key, long *out, int max, long min)
{
    const JVal *v = jget(layer, key);
    size_t i;
    if (!v || v->type != J_ARR || v->n > (size_t)max)
        die("%s: layer '%s': \"%s\" is missing or not a list of at most %d integers", g_manifest, g_layer, key, max);
    for (i = 0; i < v->n; i++) {
        out[i] = jint(&v->items[i], key);
        if (out[i] < min)
            die("%s: layer '%s': \"%s\" holds %ld, expected at least %ld", g_manifest, g_layer, key, out[i], min);
    }
    return (int)v->n;
}

static void field_pair(const JVal *layer, const char *key, long *out, long min)
{
    if (field_ints(layer, key, out, 2, min) != 2)
        die("%s: layer '%s': \"%s\" must hold 2 integers", g_manifest, g_layer, key);
}

/* -- .npy arrays --------------------------------------------------------------------------------------- */

enum { DT_F32, DT_F16, DT_I8, DT_I64 };
static const char *const DT_DESCR[] = {"<f4", "<f2", "|i1", "<i8"};
static const char *const DT_NAME[] = {"float32", "float16", "int8", "int64"};
static const size_t DT_SIZE[] = {4, 2, 1, 8};

typedef struct {
    int dtype;
    int ndim;
    size_t shape[MAX_DIMS];
    size_t count;
    const unsigned char *data; /* little-endian, C order, not necessarily aligned */
    const char *label;         /* the file (and npz entry) it came from */
} Npy;

static void npy_skip(const char *h, size_t *i, size_t n)
{
    while (*i < n && (h[*i] == ' ' || h[*i] == '\t' || h[*i] == '\n' || h[*i] == '\r'))
        (*i)++;
}

/* the header dict, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } */
static void npy_header(const char *h, size_t n, Npy *a)
{
    size_t i = 0;
    int seen_descr = 0, seen_order = 0, seen_shape = 0;
    npy_skip(h, &i, n);
    if (i >= n || h[i++] != '{')
        die("%s: bad .npy header (no dict)", a->label);
    for (;;) {
        char key[32];
        size_t k = 0;
        char quote;
        npy_skip(h, &i, n);
        if (i < n && h[i] == '}')
            break;
        if (i >= n || (h[i] != '\'' && h[i] != '"'))
            die("%s: bad .npy header (expected a key)", a->label);
        quote = h[i++];
        while (i < n && h[i] != quote && k < sizeof key - 1)
            key[k++] = h[i++];
        key[k] = '\0';
        if (i >= n || h[i++] != quote)
            die("%s: bad .npy header (key)", a->label);
        npy_skip(h, &i, n);
        if (i >= n || h[i++] != ':')
            die("%s: bad .npy header (expected ':')", a->label);
        npy_skip(h, &i, n);
        if (!strcmp(key, "descr")) {
            char descr[32];
            size_t d = 0;
            int t;
            if (i >= n || (h[i] != '\'' && h[i] != '"'))
                die("%s: unsupported .npy dtype (a structured descr)", a->label);
            quote = h[i++];
            while (i < n && h[i] != quote && d < sizeof descr - 1)
                descr[d++] = h[i++];
            descr[d] = '\0';
            i++;
            if (!strcmp(descr, "i1") || !strcmp(descr, "<i1"))
                strcpy(descr, "|i1");
            for (t = 0; t < 4 && strcmp(descr, DT_DESCR[t]); t++)
                ;
            if (t == 4)
                die("%s: dtype '%s' is not supported (this program reads '<f4', '<f2', '|i1' and '<i8')", a->label,
                    descr);
            a->dtype = t;
            seen_descr = 1;
        } else if (!strcmp(key, "fortran_order")) {
            if (n - i >= 5 && !strncmp(h + i, "False", 5)) {
                i += 5;
            } else if (n - i >= 4 && !strncmp(h + i, "True", 4)) {
                die("%s: array is in Fortran order (write it C-ordered, e.g. np.ascontiguousarray)", a->label);
            } else {
                die("%s: bad .npy header (fortran_order)", a->label);
            }
            seen_order = 1;
        } else if (!strcmp(key, "shape")) {
            if (i >= n || h[i++] != '(')
                die("%s: bad .npy header (shape)", a->label);
            a->ndim = 0;
            for (;;) {
                unsigned long long dim = 0;
                npy_skip(h, &i, n);
                if (i < n && h[i] == ')') {
                    i++;
                    break;
                }
                if (i >= n || h[i] < '0' || h[i] > '9')
                    die("%s: bad .npy header (shape)", a->label);
                while (i < n && h[i] >= '0' && h[i] <= '9') {
                    dim = dim * 10 + (unsigned long long)(h[i++] - '0');
                    if (dim > (unsigned long long)INT_MAX)
                        die("%s: shape too large", a->label);
                }
                if (a->ndim == MAX_DIMS)
                    die("%s: more than %d dimensions", a->label, MAX_DIMS);
                a->shape[a->ndim++] = (size_t)dim;
                npy_skip(h, &i, n);
                if (i < n && h[i] == ',')
                    i++;
            }
            seen_shape = 1;
        } else {
            die("%s: bad .npy header (unknown key '%s')", a->label, key);
        }
        npy_skip(h, &i, n);
        if (i < n && h[i] == ',')
            i++;
    }
    if (!seen_descr || !seen_order || !seen_shape)
        die("%s: bad .npy header (descr, fortran_order or shape missing)", a->label);
}

static Npy npy_parse(const unsigned char *bytes, size_t size, const char *label)
{
    Npy a;
    size_t header_len, start, i;
    memset(&a, 0, sizeof a);
    a.label = label;
    if (size < 10 || memcmp(bytes, "\x93NUMPY", 6))
        die("%s: not a .npy file (no \\x93NUMPY magic)", label);
    if (bytes[6] == 1) {
        header_len = le16(bytes + 8);
        start = 10;
    } else if ((bytes[6] == 2 || bytes[6] == 3) && size >= 12) {
        header_len = le32(bytes + 8);
        start = 12;
    } else {
        die("%s: .npy format version %d.%d is not supported (1.0 to 3.0)", label, bytes[6], bytes[7]);
    }
    if (header_len > size - start)
        die("%s: truncated .npy header", label);
    npy_header((const char *)bytes + start, header_len, &a);
    a.count = 1;
    for (i = 0; i < (size_t)a.ndim; i++)
        a.count = mul(a.count, a.shape[i], label);
    if (size - start - header_len != mul(a.count, DT_SIZE[a.dtype], label))
        die("%s: holds %lu data bytes, its header says %lu", label, (unsigned long)(size - start - header_len),
            (unsigned long)(a.count * DT_SIZE[a.dtype]));
    a.data = bytes + start + header_len;
    return a;
}

static void shape_text(const size_t *shape, int ndim, char *out, size_t cap)
{
    int i;
    size_t n = (size_t)snprintf(out, cap, "(");
    for (i = 0; i < ndim && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, i ? ", %lu" : "%lu", (unsigned long)shape[i]);
    if (n < cap)
        snprintf(out + n, cap - n, ndim == 1 ? ",)" : ")");
}

static int shape_is(const Npy *a, int ndim, const size_t *shape)
{
    int i;
    if (a->ndim != ndim)
        return 0;
    for (i = 0; i < ndim; i++)
        if (a->shape[i] != shape[i])
            return 0;
    return 1;
}

static void expect_shape(const Npy *a, int ndim, const size_t *shape)
{
    if (!shape_is(a, ndim, shape)) {
        char got[128], want[128];
        shape_text(a->shape, a->ndim, got, sizeof got);
        shape_text(shape, ndim, want, sizeof want);
        die("%s: shape %s, expected %s", a->label, got, want);
    }
}

static void expect_dtype(const Npy *a, int dtype)
{
    if (a->dtype != dtype)
        die("%s: dtype '%s' (%s), expected '%s' (%s)", a->label, DT_DESCR[a->dtype], DT_NAME[a->dtype],
            DT_DESCR[dtype], DT_NAME[dtype]);
}

static float *npy_floats(const Npy *a) /* float32 or float16 -> float */
{
    float *out = xmalloc(mul(a->count, sizeof *out, a->label));
    size_t i;
    for (i = 0; i < a->count; i++)
        out[i] = a->dtype == DT_F32 ? f32_from_bits(le32(a->data + 4 * i)) : half_to_float(le16(a->data + 2 * i));
    return out;
}

/* -- tables.npz: numpy's uncompressed zip ---------------------------------------------------------------- */

typedef struct {
    char *name;
    uint64_t local_offset, size, compressed;
    uint32_t method, flags, crc;
} ZipEntry;

typedef struct {
    const char *path;
    FILE *f;
    ZipEntry *entries;
    size_t n;
} Npz;

static uint32_t crc32_of(const unsigned char *p, size_t n)
{
    static uint32_t table[256];
    static int ready = 0;
    uint32_t crc = 0xFFFFFFFFu;
    size_t i;
    if (!ready) {
        uint32_t k, c;
        int b;
        for (k = 0; k < 256; k++) {
            for (c = k, b = 0; b < 8; b++)
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[k] = c;
        }
        ready = 1;
    }
    for (i = 0; i < n; i++)
        crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

static Npz npz_open(const char *path)
{
    Npz z;
    unsigned char tail[65557], *cd;
    long end;
    size_t tail_len, i, pos;
    uint64_t count, cd_size, cd_offset;
    memset(&z, 0, sizeof z);
    z.path = path;
    z.f = fopen(path, "rb");
    if (!z.f)
        die("%s: cannot open the file", path);
    if (fseek(z.f, 0, SEEK_END) != 0 || (end = ftell(z.f)) < 0)
        die("%s: cannot seek in the file", path);
    tail_len = (size_t)end < sizeof tail ? (size_t)end : sizeof tail;
    read_at(z.f, path, (uint64_t)end - tail_len, tail, tail_len);
    /* the end-of-central-directory record: the last "PK\5\6" (a zip comment may follow it) */
    for (i = tail_len < 22 ? 0 : tail_len - 22 + 1; i-- > 0;)
        if (!memcmp(tail + i, "PK\5\6", 4))
            break;
    if (tail_len < 22 || i == (size_t)-1)
        die("%s: not a zip archive (no end of central directory); expected numpy's np.savez output", path);
    count = le16(tail + i + 10);
    cd_size = le32(tail + i + 12);
    cd_offset = le32(tail + i + 16);
    if (count == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_offset == 0xFFFFFFFFu) { /* zip64 */
        unsigned char rec[56];
        if (i < 20 || memcmp(tail + i - 20, "PK\6\7", 4))
            die("%s: zip64 archive without its locator", path);
        read_at(z.f, path, le64(tail + i - 20 + 8), rec, sizeof rec);
        if (memcmp(rec, "PK\6\6", 4))
            die("%s: bad zip64 end of central directory", path);
        count = le64(rec + 32);
        cd_size = le64(rec + 40);
        cd_offset = le64(rec + 48);
    }
    if (cd_size > (uint64_t)end || count > cd_size / 46 + 1)
        die("%s: corrupt zip central directory", path);
    cd = xmalloc((size_t)cd_size);
    read_at(z.f, path, cd_offset, cd, (size_t)cd_size);
    z.entries = xmalloc(mul((size_t)count, sizeof *z.entries, path));
    for (pos = 0; z.n < count; z.n++) {
        ZipEntry *e = &z.entries[z.n];
        size_t name_len, extra_len, comment_len, x;
        if (pos + 46 > cd_size || memcmp(cd + pos, "PK\1\2", 4))
            die("%s: corrupt zip central directory (entry %lu)", path, (unsigned long)z.n);
        e->flags = le16(cd + pos + 8);
        e->method = le16(cd + pos + 10);
        e->crc = le32(cd + pos + 16);
        e->compressed = le32(cd + pos + 20);
        e->size = le32(cd + pos + 24);
        name_len = le16(cd + pos + 28);
        extra_len = le16(cd + pos + 30);
        comment_len = le16(cd + pos + 32);
        e->local_offset = le32(cd + pos + 42);
        if (pos + 46 + name_len + extra_len + comment_len > cd_size)
            die("%s: corrupt zip central directory (entry %lu)", path, (unsigned long)z.n);
        e->name = xmalloc(name_len + 1);
        memcpy(e->name, cd + pos + 46, name_len);
        e->name[name_len] = '\0';
        for (x = 0; x + 4 <= extra_len;) { /* the zip64 extra field: only the values saturated above */
            const unsigned char *field = cd + pos + 46 + name_len + x;
            size_t id = le16(field), len = le16(field + 2), at = 4;
            if (x + 4 + len > extra_len)
                break;
            if (id == 1) {
                if (e->size == 0xFFFFFFFFu && at + 8 <= 4 + len)
                    e->size = le64(field + at), at += 8;
                if (e->compressed == 0xFFFFFFFFu && at + 8 <= 4 + len)
                    e->compressed = le64(field + at), at += 8;
                if (e->local_offset == 0xFFFFFFFFu && at + 8 <= 4 + len)
                    e->local_offset = le64(field + at);
            }
            x += 4 + len;
        }
        pos += 46 + name_len + extra_len + comment_len;
    }
    free(cd);
    return z;
}

/* the bytes of entry `name` (e.g. "conv1/tables.npy"), or NULL when the archive has none */
static unsigned char *npz_read(const Npz *z, const char *name, size_t *size)
{
    unsigned char local[30], *data;
    size_t i;
    const ZipEntry *e = NULL;
    for (i = 0; i < z->n && !e; i++)
        if (!strcmp(z->entries[i].name, name))
            e = &z->entries[i];
    if (!e)
        return NULL;
    if (e->flags & 1)
        die("%s: entry '%s' is encrypted", z->path, name);
    if (e->method != 0 || e->compressed != e->size)
        die("%s: entry '%s' is compressed (zip method %lu); write tables.npz with np.savez, not np.savez_compressed",
            z->path, name, (unsigned long)e->method);
    if (e->size > (uint64_t)((size_t)-1 / 2))
        die("%s: entry '%s' is too large", z->path, name);
    read_at(z->f, z->path, e->local_offset, local, sizeof local);
    if (memcmp(local, "PK\3\4", 4))
        die("%s: entry '%s': bad local file header", z->path, name);
    data = xmalloc((size_t)e->size);
    read_at(z->f, z->path, e->local_offset + 30 + le16(local + 26) + le16(local + 28), data, (size_t)e->size);
    if (crc32_of(data, (size_t)e->size) != e->crc)
        die("%s: entry '%s' fails its CRC-32 check (damaged file)", z->path, name);
    *size = (size_t)e->size;
    return data;
}

/* One array of the layer: the manifest's "arrays" entry gives its npz key (else "<layer>/<array>"), and the
   .npy must have the dtype and shape listed there. */
static Npy *layer_array(const Npz *z, const JVal *layer, const char *array)
{
    const JVal *listing = jget(jget(layer, "arrays"), array);
    const JVal *key = jget(listing, "key");
    char *entry, *label;
    unsigned char *bytes;
    size_t size;
    Npy *a;
    if (key && key->type != J_STR)
        die("%s: layer '%s': arrays.%s.key is not a string", g_manifest, g_layer, array);
    entry = xmalloc(strlen(g_layer) + strlen(array) + (key ? strlen(key->str) : 0) + 8);
    if (key)
        sprintf(entry, "%s.npy", key->str);
    else
        sprintf(entry, "%s/%s.npy", g_layer, array);
    bytes = npz_read(z, entry, &size);
    if (!bytes)
        die("%s: no entry '%s' (array '%s' of layer '%s')", z->path, entry, array, g_layer);
    label = xmalloc(strlen(z->path) + strlen(entry) + 4);
    sprintf(label, "%s[%s]", z->path, entry);
    a = xmalloc(sizeof *a);
    *a = npy_parse(bytes, size, label);
    if (listing) { /* the manifest's listing must describe what is stored */
        const JVal *dtype = jget(listing, "dtype"), *shape = jget(listing, "shape");
        size_t i;
        if (dtype && (dtype->type != J_STR || strcmp(dtype->str, DT_NAME[a->dtype])))
            die("%s: dtype %s, the manifest lists %s", label, DT_NAME[a->dtype],
                dtype->type == J_STR ? dtype->str : "a non-string");
        if (shape) {
            int same = shape->type == J_ARR && shape->n == (size_t)a->ndim;
            for (i = 0; same && i < shape->n; i++)
                same = shape->items[i].type == J_NUM && shape->items[i].num == (double)a->shape[i];
            if (!same)
                die("%s: shape does not match the manifest's listing", label);
        }
    }
    return a;
}

/* -- the layer ------------------------------------------------------------------------------------------- */

typedef struct {
    int conv;
    long in_ch, kh, kw, sh, sw, ph, pw, dh, dw; /* conv geometry (linear: in_ch = D, kernel 1x1) */
    size_t D, M, C, K, s, Dpad, L;
    int tree, lut;          /* lut: DT_F32, DT_F16 or DT_I8 */
    float *prototypes;      /* exhaustive (C, K, s) */
    float *proto_norms;     /* exhaustive (C, K): ||p||^2 in float32, as the library */
    int64_t *split_dims;    /* tree (C, L) */
    float *thresholds;      /* tree (C, K - 1) */
    float *ftables;         /* float tables (C, K, M), float16 widened */
    int8_t *qtables;        /* int8 tables (C, K, M) */
    float *scale;           /* int8: per output (M), a layer's single scale repeated */
    float *offset_sums;     /* int8: per output, sum over codebooks of the offsets */
} Layer;

static const JVal *find_layer(const JVal *root, const char *name)
{
    const JVal *layers = jget(root, "layers");
    char names[512] = "";
    size_t i, used = 0;
    if (!layers || layers->type != J_ARR)
        die("%s: no \"layers\" list (not a tabconv export manifest?)", g_manifest);
    for (i = 0; i < layers->n; i++) {
        const JVal *n = jget(&layers->items[i], "name");
        if (n && n->type == J_STR && !strcmp(n->str, name))
            return &layers->items[i];
        if (n && n->type == J_STR && used + strlen(n->str) + 8 < sizeof names)
            used += (size_t)sprintf(names + used, "%s%s", used ? ", " : "", n->str);
    }
    die("%s: no layer named '%s' (layers: %s%s)", g_manifest, name, names, i && used + 8 >= sizeof names ? ", ..." : "");
    return NULL;
}

static void load_layer(Layer *y, const JVal *layer, const Npz *z)
{
    const char *kind = field_str(layer, "kind"), *mode, *encoder, *lut;
    const JVal *inner = jget(layer, "inner_dim"), *folded = jget(layer, "bias_folded");
    Npy *a;
    size_t i, c, k, shape[3];
    memset(y, 0, sizeof *y);
    mode = jget(layer, "mode") ? field_str(layer, "mode") : "table";
    if (strcmp(mode, "table"))
        die("%s: layer '%s' is %s (mode \"%s\"): it has no tables to run; its weights are in model.pt only",
            g_manifest, g_layer, mode, mode);
    if (!strcmp(kind, "conv")) {
        long pair[2];
        long groups = jget(layer, "groups") ? field_int(layer, "groups", 1) : 1;
        if (groups != 1)
            die("%s: layer '%s' is a grouped convolution (groups=%ld): this program runs groups=1 only, as the npz "
                "export writes ungrouped tables only", g_manifest, g_layer, groups);
        y->conv = 1;
        y->in_ch = field_int(layer, "in_channels", 1);
        y->M = (size_t)field_int(layer, "out_channels", 1);
        field_pair(layer, "kernel_size", pair, 1), y->kh = pair[0], y->kw = pair[1];
        field_pair(layer, "stride", pair, 1), y->sh = pair[0], y->sw = pair[1];
        field_pair(layer, "padding", pair, 0), y->ph = pair[0], y->pw = pair[1];
        field_pair(layer, "dilation", pair, 1), y->dh = pair[0], y->dw = pair[1];
        y->D = mul(mul((size_t)y->in_ch, (size_t)y->kh, g_layer), (size_t)y->kw, g_layer);
    } else if (!strcmp(kind, "linear")) {
        y->in_ch = field_int(layer, "in_features", 1);
        y->M = (size_t)field_int(layer, "out_features", 1);
        y->D = (size_t)y->in_ch;
    } else {
        die("%s: layer '%s': kind \"%s\" is not supported (conv or linear)", g_manifest, g_layer, kind);
    }
    if (inner && (size_t)jint(inner, "inner_dim") != y->D)
        die("%s: layer '%s': inner_dim %ld, the geometry gives D = %lu", g_manifest, g_layer, jint(inner, "inner_dim"),
            (unsigned long)y->D);
    if (folded && folded->type != J_TRUE)
        die("%s: layer '%s': bias_folded is not true (this program adds no bias)", g_manifest, g_layer);
    y->C = (size_t)field_int(layer, "codebooks", 1);
    y->K = (size_t)field_int(layer, "centroids", 1);
    y->s = (y->D + y->C - 1) / y->C;
    y->Dpad = mul(y->C, y->s, g_layer);
    if ((size_t)field_int(layer, "padded_dim", 1) != y->Dpad)
        die("%s: layer '%s': padded_dim %ld, expected C * ceil(D / C) = %lu", g_manifest, g_layer,
            field_int(layer, "padded_dim", 1), (unsigned long)y->Dpad);
    if ((size_t)field_int(layer, "subspace_width", 1) != y->s)
        die("%s: layer '%s': subspace_width %ld, expected padded_dim / C = %lu", g_manifest, g_layer,
            field_int(layer, "subspace_width", 1), (unsigned long)y->s);

    encoder = field_str(layer, "encoder");
    if (!strcmp(encoder, "exhaustive")) {
        a = layer_array(z, layer, "prototypes");
        expect_dtype(a, DT_F32);
        shape[0] = y->C, shape[1] = y->K, shape[2] = y->s;
        expect_shape(a, 3, shape);
        y->prototypes = npy_floats(a);
        y->proto_norms = xmalloc(mul(y->C * y->K, sizeof(float), g_layer));
        for (i = 0; i < y->C * y->K; i++) {
            float norm = 0.0f;
            for (k = 0; k < y->s; k++)
                norm += y->prototypes[i * y->s + k] * y->prototypes[i * y->s + k];
            y->proto_norms[i] = norm;
        }
    } else if (!strcmp(encoder, "tree")) {
        y->tree = 1;
        y->L = (size_t)field_int(layer, "tree_depth", 0);
        if (y->L > 30 || y->K != (size_t)1 << y->L)
            die("%s: layer '%s': tree_depth %lu does not give K = %lu leaves", g_manifest, g_layer,
                (unsigned long)y->L, (unsigned long)y->K);
        a = layer_array(z, layer, "split_dims");
        expect_dtype(a, DT_I64);
        shape[0] = y->C, shape[1] = y->L;
        expect_shape(a, 2, shape);
        y->split_dims = xmalloc(mul(a->count, sizeof(int64_t), g_layer));
        for (i = 0; i < a->count; i++) {
            y->split_dims[i] = (int64_t)le64(a->data + 8 * i);
            if (y->split_dims[i] < 0 || (uint64_t)y->split_dims[i] >= y->s)
                die("%s: split dimension %ld is outside the subspace width %lu", a->label, (long)y->split_dims[i],
                    (unsigned long)y->s);
        }
        a = layer_array(z, layer, "thresholds");
        expect_dtype(a, DT_F32);
        shape[0] = y->C, shape[1] = y->K - 1;
        expect_shape(a, 2, shape);
        y->thresholds = npy_floats(a);
    } else {
        die("%s: layer '%s': encoder \"%s\" is not supported (exhaustive or tree)", g_manifest, g_layer, encoder);
    }

    lut = field_str(layer, "lut_dtype");
    for (y->lut = 0; y->lut < 3 && strcmp(lut, DT_NAME[y->lut]); y->lut++)
        ;
    if (y->lut == 3)
        die("%s: layer '%s': lut_dtype \"%s\" is not supported (float32, float16 or int8)", g_manifest, g_layer, lut);
    a = layer_array(z, layer, "tables");
    expect_dtype(a, y->lut);
    shape[0] = y->C, shape[1] = y->K, shape[2] = y->M;
    expect_shape(a, 3, shape);
    if (y->lut != DT_I8) {
        y->ftables = npy_floats(a);
        return;
    }
    y->qtables = xmalloc(a->count);
    memcpy(y->qtables, a->data, a->count); /* int8: two's complement on every C99 platform with int8_t */

    /* int8 dequantisation: table_scale () or (M,), table_offset (C,) or (C, M) */
    y->scale = xmalloc(mul(y->M, sizeof(float), g_layer));
    y->offset_sums = xmalloc(mul(y->M, sizeof(float), g_layer));
    a = layer_array(z, layer, "table_scale");
    expect_dtype(a, DT_F32);
    if (!(a->ndim == 0 || shape_is(a, 1, &y->M))) {
        char got[128];
        shape_text(a->shape, a->ndim, got, sizeof got);
        die("%s: shape %s, expected () or (%lu,)", a->label, got, (unsigned long)y->M);
    }
    for (i = 0; i < y->M; i++)
        y->scale[i] = f32_from_bits(le32(a->data + 4 * (a->ndim ? i : 0)));
    a = layer_array(z, layer, "table_offset");
    expect_dtype(a, DT_F32);
    shape[0] = y->C, shape[1] = y->M;
    if (!(shape_is(a, 1, shape) || shape_is(a, 2, shape))) {
        char got[128];
        shape_text(a->shape, a->ndim, got, sizeof got);
        die("%s: shape %s, expected (%lu,) or (%lu, %lu)", a->label, got, (unsigned long)y->C, (unsigned long)y->C,
            (unsigned long)y->M);
    }
    for (i = 0; i < y->M; i++) {
        float sum = 0.0f;
        for (c = 0; c < y->C; c++)
            sum += f32_from_bits(le32(a->data + 4 * (a->ndim == 2 ? c * y->M + i : c)));
        y->offset_sums[i] = sum;
    }
}

/* codes[c] for the zero-padded row x (D_pad values) */
static void encode(const Layer *y, const float *x, size_t *codes)
{
    size_t c, k, j;
    for (c = 0; c < y->C; c++) {
        const float *xs = x + c * y->s;
        if (y->tree) {
            size_t node = 0, level;
            for (level = 0; level < y->L; level++) {
                float v = xs[y->split_dims[c * y->L + level]];
                float t = y->thresholds[c * (y->K - 1) + ((size_t)1 << level) - 1 + node];
                node = 2 * node + (v > t ? 1 : 0);
            }
            codes[c] = node;
        } else {
            size_t best = 0;
            float best_score = 0.0f;
            for (k = 0; k < y->K; k++) {
                const float *p = y->prototypes + (c * y->K + k) * y->s;
                float dot = 0.0f, score;
                for (j = 0; j < y->s; j++)
                    dot += xs[j] * p[j];
                score = y->proto_norms[c * y->K + k] - 2.0f * dot; /* ||x||^2 is the same for every k */
                if (k == 0 || score < best_score)
                    best = k, best_score = score;
            }
            codes[c] = best;
        }
    }
}

/* out[m] (strided by `stride` floats) for the codes of one row */
static void lookup(const Layer *y, const size_t *codes, float *out, size_t stride, float *facc, int32_t *iacc)
{
    size_t c, m;
    if (y->lut == DT_I8) {
        memset(iacc, 0, y->M * sizeof *iacc);
        for (c = 0; c < y->C; c++) {
            const int8_t *row = y->qtables + (c * y->K + codes[c]) * y->M;
            for (m = 0; m < y->M; m++)
                iacc[m] += row[m];
        }
        for (m = 0; m < y->M; m++)
            out[m * stride] = y->scale[m] * (float)(iacc[m] + 128 * (int32_t)y->C) + y->offset_sums[m];
        return;
    }
    memset(facc, 0, y->M * sizeof *facc);
    for (c = 0; c < y->C; c++) {
        const float *row = y->ftables + (c * y->K + codes[c]) * y->M;
        for (m = 0; m < y->M; m++)
            facc[m] += row[m];
    }
    for (m = 0; m < y->M; m++)
        out[m * stride] = facc[m];
}

/* -- output -------------------------------------------------------------------------------------------- */

static void write_npy(const char *path, const float *data, const size_t *shape, int ndim)
{
    char header[256], dims[160];
    size_t n = 1, i, len, total;
    char *tmp = xmalloc(strlen(path) + 8);
    unsigned char prefix[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, 0, 0};
    FILE *f;
    shape_text(shape, ndim, dims, sizeof dims);
    len = (size_t)sprintf(header, "{'descr': '<f4', 'fortran_order': False, 'shape': %s, }", dims);
    total = (10 + len + 1 + 63) / 64 * 64; /* the header ends in '\n' and the data starts 64-byte aligned */
    while (10 + len + 1 < total)
        header[len++] = ' ';
    header[len++] = '\n';
    prefix[8] = (unsigned char)(len & 0xFF), prefix[9] = (unsigned char)(len >> 8);
    for (i = 0; i < (size_t)ndim; i++)
        n *= shape[i];
    sprintf(tmp, "%s.tmp", path); /* written whole, then renamed: never a half-written OUTPUT.npy */
    f = fopen(tmp, "wb");
    if (!f)
        die("%s: cannot create the file", tmp);
    fwrite(prefix, 1, sizeof prefix, f);
    fwrite(header, 1, len, f);
    for (i = 0; i < n; i++) {
        uint32_t bits;
        unsigned char le[4];
        memcpy(&bits, &data[i], 4);
        le[0] = (unsigned char)bits, le[1] = (unsigned char)(bits >> 8);
        le[2] = (unsigned char)(bits >> 16), le[3] = (unsigned char)(bits >> 24);
        fwrite(le, 1, 4, f);
    }
    if (ferror(f) | fclose(f)) {
        remove(tmp);
        die("%s: write error", tmp);
    }
    if (rename(tmp, path) != 0) { /* some systems will not rename over an existing file */
        remove(path);
        if (rename(tmp, path) != 0) {
            remove(tmp);
            die("%s: cannot write the file", path);
        }
    }
}

/* -- main ----------------------------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
    const char *dir, *input_path, *output_path;
    unsigned char *text, *input_bytes;
    size_t size, N, Ho = 1, Wo = 1, rows, r, out_shape[4];
    long in_shape[3], man_out[3];
    int n_in, n_out;
    JParser parser;
    JVal root;
    const JVal *layer;
    Npz z;
    Layer y;
    Npy in;
    float *input, *x, *output, *facc;
    int32_t *iacc;
    size_t *codes;

    if (sizeof(float) != 4)
        die("this program needs 32-bit IEEE floats");
    if (argc != 5)
        die("usage: tabconv_layer EXPORT_DIR LAYER_NAME INPUT.npy OUTPUT.npy");
    dir = argv[1], g_layer = argv[2], input_path = argv[3], output_path = argv[4];

    g_manifest = join_path(dir, "manifest.json");
    text = read_file(g_manifest, &size);
    memset(&root, 0, sizeof root);
    parser.s = (const char *)text, parser.len = size, parser.pos = 0, parser.file = g_manifest;
    jvalue(&parser, &root, 0);
    jspace(&parser);
    if (parser.pos != parser.len)
        jfail(&parser, "trailing characters");
    layer = find_layer(&root, g_layer);
    z = npz_open(join_path(dir, "tables.npz"));
    load_layer(&y, layer, &z);
    fclose(z.f);

    /* the input: (N, C, H, W) float32 for a conv, (N, D) for a linear layer */
    input_bytes = read_file(input_path, &size);
    in = npy_parse(input_bytes, size, input_path);
    if (in.dtype != DT_F32)
        die("%s: dtype '%s' (%s), expected '<f4' (float32)", input_path, DT_DESCR[in.dtype], DT_NAME[in.dtype]);
    n_in = field_ints(layer, "input_shape", in_shape, 3, 1);
    n_out = field_ints(layer, "output_shape", man_out, 3, 1);
    N = in.ndim ? in.shape[0] : 0;
    if (y.conv) {
        long H, W;
        if (in.ndim != 4 || in.shape[1] != (size_t)y.in_ch)
            die("%s: shape must be (N, %ld, H, W) for conv layer '%s'", input_path, y.in_ch, g_layer);
        H = (long)in.shape[2], W = (long)in.shape[3];
        if (H + 2 * y.ph - y.dh * (y.kh - 1) - 1 < 0 || W + 2 * y.pw - y.dw * (y.kw - 1) - 1 < 0)
            die("%s: %ldx%ld images are smaller than the kernel of layer '%s'", input_path, H, W, g_layer);
        Ho = (size_t)((H + 2 * y.ph - y.dh * (y.kh - 1) - 1) / y.sh + 1);
        Wo = (size_t)((W + 2 * y.pw - y.dw * (y.kw - 1) - 1) / y.sw + 1);
        /* at the exported input size, the manifest's output size must be what the geometry gives */
        if (n_in == 3 && n_out == 3 && in_shape[1] == H && in_shape[2] == W &&
            (man_out[0] != (long)y.M || man_out[1] != (long)Ho || man_out[2] != (long)Wo))
            die("%s: layer '%s': output_shape [%ld, %ld, %ld] does not follow from its geometry ([%lu, %lu, %lu])",
                g_manifest, g_layer, man_out[0], man_out[1], man_out[2], (unsigned long)y.M, (unsigned long)Ho,
                (unsigned long)Wo);
    } else if (in.ndim != 2 || in.shape[1] != y.D) {
        die("%s: shape must be (N, %lu) for linear layer '%s'", input_path, (unsigned long)y.D, g_layer);
    }
    input = npy_floats(&in);
    free(input_bytes);

    rows = mul(mul(N, Ho, input_path), Wo, input_path);
    output = xmalloc(mul(rows, y.M * sizeof(float), output_path));
    x = xmalloc(y.Dpad * sizeof *x);
    codes = xmalloc(y.C * sizeof *codes);
    facc = xmalloc(y.M * sizeof *facc);
    iacc = xmalloc(y.M * sizeof *iacc);
    memset(x, 0, y.Dpad * sizeof *x); /* columns D .. D_pad - 1 stay 0 */
    for (r = 0; r < rows; r++) {
        size_t n = r / (Ho * Wo), ho = r / Wo % Ho, wo = r % Wo;
        if (y.conv) { /* im2col: column d = c_in * (kh * kw) + ky * kw + kx */
            long H = (long)in.shape[2], W = (long)in.shape[3], ci, ky, kx;
            float *col = x;
            for (ci = 0; ci < y.in_ch; ci++) {
                const float *plane = input + (n * (size_t)y.in_ch + (size_t)ci) * (size_t)(H * W);
                for (ky = 0; ky < y.kh; ky++) {
                    long hi = (long)ho * y.sh - y.ph + ky * y.dh;
                    for (kx = 0; kx < y.kw; kx++) {
                        long wi = (long)wo * y.sw - y.pw + kx * y.dw;
                        *col++ = (hi >= 0 && hi < H && wi >= 0 && wi < W) ? plane[hi * W + wi] : 0.0f;
                    }
                }
            }
            encode(&y, x, codes);
            /* output[n, m, ho, wo] */
            lookup(&y, codes, output + n * y.M * Ho * Wo + ho * Wo + wo, Ho * Wo, facc, iacc);
        } else {
            memcpy(x, input + n * y.D, y.D * sizeof *x);
            encode(&y, x, codes);
            lookup(&y, codes, output + n * y.M, 1, facc, iacc);
        }
    }
    out_shape[0] = N, out_shape[1] = y.M, out_shape[2] = Ho, out_shape[3] = Wo;
    write_npy(output_path, output, out_shape, y.conv ? 4 : 2);
    return 0;
}
