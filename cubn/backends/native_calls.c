/* Direct calls of the compiled loops' one-thread entry points.
 *
 * numpy_native loads native_loops.cpp's entry points through ctypes, which
 * converts each argument through Python: about 0.15 us an argument, and
 * 0.25 us more to read an array's address, so a 20-argument training
 * forward pays some 7 us before its loops start -- more than the loops take
 * below a few thousand elements. This CPython extension takes the same
 * calls with the arrays themselves as arguments and reads their addresses
 * from the objects. numpy_native builds it on first use where Python's
 * headers are installed (else the ctypes calls stay in use) and hands it,
 * through init(), NumPy's array type, the offset of an array's data pointer
 * in its object (checked there against __array_interface__) and the entry
 * points' addresses. The callers have checked dtypes, shapes and
 * contiguity; this file checks only that an array argument is an ndarray.
 * The GIL is released during each call, as ctypes does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

typedef int64_t i64;

typedef void (*train_fn)(int, const void *, const void *, void *, const i64 *, double, double, const void *,
                         const void *, void *, void *, void *, void *, void *, double, int, const void *,
                         const void *, void *, void *);
typedef void (*infer_fn)(int, const void *, const void *, void *, i64, i64, i64, i64, double, const void *,
                         const void *, const void *, const void *, void *, void *);
typedef void (*stats_fn)(const void *, const i64 *, double, void *, void *);
typedef void (*backward_fn)(int, const void *, const void *, const void *, void *, void *, const i64 *, int,
                            const void *, const void *, const void *, const void *, const void *, const void *,
                            const void *, void *, void *, void *, void *, void *);

static PyTypeObject *array_type;
static Py_ssize_t data_offset = -1;
/* [0] float32, [1] float64 */
static train_fn train_f[2];
static infer_fn infer_f[2];
static stats_fn stats_f[2];
static backward_fn backward_f[2];

/* an array's data pointer, or NULL for None; -1 (and an exception) for anything else */
static int arg_array(PyObject *o, void **p) {
    if (o == Py_None) {
        *p = NULL;
        return 0;
    }
    if (Py_TYPE(o) != array_type && !PyObject_TypeCheck(o, array_type)) {
        PyErr_Format(PyExc_TypeError, "cubn native call: expected a NumPy array or None, got %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    *p = *(void **)((char *)o + data_offset);
    return 0;
}

static int arg_int(PyObject *o, i64 *v) {
    *v = (i64)PyLong_AsLongLong(o);
    return (*v == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int arg_double(PyObject *o, double *v) {
    *v = PyFloat_AsDouble(o);
    return (*v == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* args[at] .. args[at + n - 1] as arrays into p[0 .. n - 1] */
static int arg_arrays(PyObject *const *args, int at, int n, void **p) {
    for (int k = 0; k < n; ++k)
        if (arg_array(args[at + k], p + k) < 0) return -1;
    return 0;
}

static int check(Py_ssize_t nargs, Py_ssize_t want, const char *name, i64 kind) {
    if (data_offset < 0) {
        PyErr_SetString(PyExc_RuntimeError, "cubn native call: init() was not called");
        return -1;
    }
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
        return -1;
    }
    if (kind != 0 && kind != 1) {
        PyErr_Format(PyExc_ValueError, "%s: kind is 0 (float32) or 1 (float64), not %lld", name, (long long)kind);
        return -1;
    }
    return 0;
}

/* init(ndarray, data_offset, (train_f4, train_f8, infer_f4, infer_f8, stats_f4, stats_f8, backward_f4, backward_f8)) */
static PyObject *init(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3 || !PyType_Check(args[0]) || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 8) {
        PyErr_SetString(PyExc_TypeError, "init(ndarray type, data offset, tuple of 8 entry point addresses)");
        return NULL;
    }
    i64 offset;
    if (arg_int(args[1], &offset) < 0) return NULL;
    void *fn[8];
    for (int k = 0; k < 8; ++k) {
        fn[k] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args[2], k));
        if (fn[k] == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "init: a null entry point");
            return NULL;
        }
    }
    Py_INCREF(args[0]);
    Py_XDECREF((PyObject *)array_type);
    array_type = (PyTypeObject *)args[0];
    data_offset = (Py_ssize_t)offset;
    for (int k = 0; k < 2; ++k) {
        train_f[k] = (train_fn)fn[k];
        infer_f[k] = (infer_fn)fn[2 + k];
        stats_f[k] = (stats_fn)fn[4 + k];
        backward_f[k] = (backward_fn)fn[6 + k];
    }
    Py_RETURN_NONE;
}

/* train(kind, flags, x, side, y, plan, ratio, eps, gamma, beta, mean, var, invstd, scale, shift, a, bessel,
         mean_in, var_in, mean_out, var_out) */
static PyObject *train(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    i64 kind = 0, flags, plan, bessel;
    double ratio, eps, a;
    void *p3[3], *p7[7], *p4[4];
    if ((nargs > 0 && arg_int(args[0], &kind) < 0) || check(nargs, 21, "train", kind) < 0) return NULL;
    if (arg_int(args[1], &flags) < 0 || arg_arrays(args, 2, 3, p3) < 0 || arg_int(args[5], &plan) < 0 ||
        arg_double(args[6], &ratio) < 0 || arg_double(args[7], &eps) < 0 || arg_arrays(args, 8, 7, p7) < 0 ||
        arg_double(args[15], &a) < 0 || arg_int(args[16], &bessel) < 0 || arg_arrays(args, 17, 4, p4) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    train_f[kind]((int)flags, p3[0], p3[1], p3[2], (const i64 *)(intptr_t)plan, ratio, eps, p7[0], p7[1], p7[2],
                  p7[3], p7[4], p7[5], p7[6], a, (int)bessel, p4[0], p4[1], p4[2], p4[3]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* infer(kind, flags, x, side, y, outer, channels, inner, width, eps, gamma, beta, mean, var, scale, shift) */
static PyObject *infer(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    i64 kind = 0, flags, shape[4];
    double eps;
    void *p3[3], *p6[6];
    if ((nargs > 0 && arg_int(args[0], &kind) < 0) || check(nargs, 16, "infer", kind) < 0) return NULL;
    if (arg_int(args[1], &flags) < 0 || arg_arrays(args, 2, 3, p3) < 0) return NULL;
    for (int k = 0; k < 4; ++k)
        if (arg_int(args[5 + k], shape + k) < 0) return NULL;
    if (arg_double(args[9], &eps) < 0 || arg_arrays(args, 10, 6, p6) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    infer_f[kind]((int)flags, p3[0], p3[1], p3[2], shape[0], shape[1], shape[2], shape[3], eps, p6[0], p6[1],
                  p6[2], p6[3], p6[4], p6[5]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* (kind, x, plan, ratio, mean, out) of stats() and moments(); -1 and an exception when they are not */
static int stats_args(PyObject *const *args, Py_ssize_t nargs, const char *name, i64 *kind, void **x,
                      const i64 **plan, double *ratio, void **p2) {
    i64 address;
    *kind = 0;
    if ((nargs > 0 && arg_int(args[0], kind) < 0) || check(nargs, 6, name, *kind) < 0) return -1;
    if (arg_array(args[1], x) < 0 || arg_int(args[2], &address) < 0 || arg_double(args[3], ratio) < 0 ||
        arg_arrays(args, 4, 2, p2) < 0)
        return -1;
    *plan = (const i64 *)(intptr_t)address;
    return 0;
}

/* stats(kind, x, plan, ratio, mean, m2) */
static PyObject *stats(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    i64 kind;
    const i64 *plan;
    double ratio;
    void *x, *p2[2];
    if (stats_args(args, nargs, "stats", &kind, &x, &plan, &ratio, p2) < 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    stats_f[kind](x, plan, ratio, p2[0], p2[1]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* backward(kind, flags, dy, x, side, dx, dside, plan, training, mean, scale, shift, gcoef, hcoef, count, invstd,
            s1, s2, dgamma, k1, k2) */
static PyObject *backward(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    i64 kind = 0, flags, plan, training;
    void *p5[5], *p12[12];
    if ((nargs > 0 && arg_int(args[0], &kind) < 0) || check(nargs, 21, "backward", kind) < 0) return NULL;
    if (arg_int(args[1], &flags) < 0 || arg_arrays(args, 2, 5, p5) < 0 || arg_int(args[7], &plan) < 0 ||
        arg_int(args[8], &training) < 0 || arg_arrays(args, 9, 12, p12) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    backward_f[kind]((int)flags, p5[0], p5[1], p5[2], p5[3], p5[4], (const i64 *)(intptr_t)plan, (int)training,
                     p12[0], p12[1], p12[2], p12[3], p12[4], p12[5], p12[6], p12[7], p12[8], p12[9], p12[10],
                     p12[11]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* A shape's plan block (numpy_native._plan_block): [kind, outer, C, inner, ...] */
static i64 plan_channels(const i64 *plan) { return plan[2]; }
static i64 plan_count(const i64 *plan) { return plan[1] * plan[3]; }

/* moments(kind, x, plan, ratio, mean, var): the statistics, then var = M2 / n in the data's type (as
   np.divide(m2, n) rounds: n converted to the type, one correctly rounded division) */
static PyObject *moments(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    i64 kind;
    const i64 *pl;
    double ratio;
    void *x, *p2[2];
    if (stats_args(args, nargs, "moments", &kind, &x, &pl, &ratio, p2) < 0) return NULL;
    const i64 c = plan_channels(pl), n = plan_count(pl);
    Py_BEGIN_ALLOW_THREADS
    stats_f[kind](x, pl, ratio, p2[0], p2[1]);
    if (kind == 0) {
        float *v = (float *)p2[1];
        const float fn = (float)n;
        for (i64 k = 0; k < c; ++k) v[k] = v[k] / fn;
    } else {
        double *v = (double *)p2[1];
        const double dn = (double)n;
        for (i64 k = 0; k < c; ++k) v[k] = v[k] / dn;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The fold of given statistics, as numpy_small.given_stats rounds it (one ufunc per step): invstd =
   1 / sqrt(var + eps), scale = gamma * invstd (invstd without gamma), shift = gamma * 0 + beta (gamma * 0
   without beta, beta + 0 without gamma, else 0), hcoef = 0, count = n; into work[0 .. 5c) as invstd,
   scale, shift, hcoef, count. Returns the scale's address (invstd's without gamma). */
#define CUBN_FOLD_GIVEN(T, SQRT)                                                                           \
    static T *fold_given_##T(i64 c, i64 n, double eps, const T *var, const T *gamma, const T *beta, T *w) { \
        T *inv = w, *sc = w + c, *sh = w + 2 * c, *hc = w + 3 * c, *cnt = w + 4 * c;                       \
        const T e = (T)eps, tn = (T)n, zero = (T)0;                                                        \
        for (i64 k = 0; k < c; ++k) {                                                                      \
            volatile T t = var[k] + e;                                                                     \
            t = SQRT(t);                                                                                   \
            inv[k] = (T)1 / t;                                                                             \
            hc[k] = zero;                                                                                  \
            cnt[k] = tn;                                                                                   \
            if (gamma) {                                                                                   \
                sc[k] = gamma[k] * inv[k];                                                                 \
                volatile T g0 = gamma[k] * zero;                                                           \
                sh[k] = beta ? g0 + beta[k] : g0;                                                          \
            } else {                                                                                       \
                sh[k] = beta ? beta[k] + zero : zero;                                                      \
            }                                                                                              \
        }                                                                                                  \
        return gamma ? sc : inv;                                                                           \
    }
CUBN_FOLD_GIVEN(float, sqrtf)
CUBN_FOLD_GIVEN(double, sqrt)

/* backward_given(kind, flags, dy, x, side, dx, dside, plan, training, eps, mean, var, gamma, beta, work,
                  dgamma, s1): the fold of the given statistics (above; work holds 8 C values: the fold's five,
                  then S2, k1, k2), then the one-thread backward */
static PyObject *backward_given(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    i64 kind = 0, flags, plan, training;
    double eps;
    void *p5[5], *p7[7];
    if ((nargs > 0 && arg_int(args[0], &kind) < 0) || check(nargs, 17, "backward_given", kind) < 0) return NULL;
    if (arg_int(args[1], &flags) < 0 || arg_arrays(args, 2, 5, p5) < 0 || arg_int(args[7], &plan) < 0 ||
        arg_int(args[8], &training) < 0 || arg_double(args[9], &eps) < 0 || arg_arrays(args, 10, 7, p7) < 0)
        return NULL;
    const i64 *pl = (const i64 *)(intptr_t)plan;
    const i64 c = plan_channels(pl), n = plan_count(pl);
    Py_BEGIN_ALLOW_THREADS
    if (kind == 0) {
        float *w = (float *)p7[4], *scale = fold_given_float(c, n, eps, p7[1], p7[2], p7[3], w);
        backward_f[0]((int)flags, p5[0], p5[1], p5[2], p5[3], p5[4], pl, (int)training, p7[0], scale, w + 2 * c,
                      w, w + 3 * c, w + 4 * c, w, p7[6], w + 5 * c, p7[5], w + 6 * c, w + 7 * c);
    } else {
        double *w = (double *)p7[4], *scale = fold_given_double(c, n, eps, p7[1], p7[2], p7[3], w);
        backward_f[1]((int)flags, p5[0], p5[1], p5[2], p5[3], p5[4], pl, (int)training, p7[0], scale, w + 2 * c,
                      w, w + 3 * c, w + 4 * c, w, p7[6], w + 5 * c, p7[5], w + 6 * c, w + 7 * c);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"init", (PyCFunction)(void (*)(void))init, METH_FASTCALL, "init(ndarray, data_offset, entry points)"},
    {"train", (PyCFunction)(void (*)(void))train, METH_FASTCALL, "the one-thread training forward"},
    {"infer", (PyCFunction)(void (*)(void))infer, METH_FASTCALL, "the one-thread inference forward"},
    {"stats", (PyCFunction)(void (*)(void))stats, METH_FASTCALL, "the one-thread statistics"},
    {"backward", (PyCFunction)(void (*)(void))backward, METH_FASTCALL, "the one-thread backward"},
    {"moments", (PyCFunction)(void (*)(void))moments, METH_FASTCALL, "the one-thread statistics as (mean, var)"},
    {"backward_given", (PyCFunction)(void (*)(void))backward_given, METH_FASTCALL,
     "the one-thread backward from given statistics"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cubn_native_calls", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__cubn_native_calls(void) { return PyModule_Create(&module); }
