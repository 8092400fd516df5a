/* One pass over a CPU model's gradients and weights per training step (lossatlas/norms.py, StepNorms).
 *
 * step_norms(params, sizes, known, prev, out, itemsize, dtype) reads every parameter's weight and
 * ``.grad`` (a missing gradient counts as zero) of sizes[i] float32 (itemsize 4) or float64 (8)
 * elements and writes
 *   prev  (an address of sum(sizes) elements of the same dtype): the weights, for the next update;
 *   out   (an address of 3n doubles): [‖g_i‖², ‖w_i‖², ‖w_i − prev_i‖²] for i < n.
 * It first checks, through each tensor's own attributes, that every weight and gradient is a dense,
 * contiguous CPU tensor of that dtype and size, and returns False touching nothing otherwise.
 * float32: partial sums in float32 over blocks of 256 elements (32 terms per vector lane), float64
 * across blocks (relative error ~1e-7); float64: float64 throughout. The pass is vectorized (AVX2
 * where the CPU has it, chosen at load time) and reads every element once, while it is in cache.
 * The GIL is released for the pass; prev and out are the caller's buffers (lossatlas/norms.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* 8 floats / 4 doubles per vector (GCC/Clang vector extensions; two SSE registers without AVX) */
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
#define LOAD(v, x) memcpy(&(v), (x), sizeof(v))
#define STORE(x, v) memcpy((x), &(v), sizeof(v))
#define BLOCK 256 /* float32 partial sums over at most 256 elements (32 per lane), then float64 */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default"))) /* AVX2+FMA where present */
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void pass_f32(const float *restrict g, const float *restrict w, float *restrict p, Py_ssize_t m,
                     double *restrict out) {
    double sg = 0.0, sw = 0.0, sd = 0.0;
    Py_ssize_t j = 0, body = m - m % 8;
    while (j < body) {
        Py_ssize_t end = j + BLOCK < body ? j + BLOCK : body;
        v8f ag = {0}, aw = {0}, ad = {0}, wj, pj, gj, d;
        for (; j < end; j += 8) {
            LOAD(wj, w + j);
            LOAD(pj, p + j);
            STORE(p + j, wj);
            d = wj - pj;
            aw += wj * wj;
            ad += d * d;
            if (g) {
                LOAD(gj, g + j);
                ag += gj * gj;
            }
        }
        for (int l = 0; l < 8; ++l) {
            sg += ag[l];
            sw += aw[l];
            sd += ad[l];
        }
    }
    for (; j < m; ++j) {
        double wj = w[j], d = wj - (double)p[j];
        p[j] = w[j];
        sw += wj * wj;
        sd += d * d;
        if (g) sg += (double)g[j] * (double)g[j];
    }
    out[0] = sg;
    out[1] = sw;
    out[2] = sd;
}

MULTIVERSION
static void pass_f64(const double *restrict g, const double *restrict w, double *restrict p, Py_ssize_t m,
                     double *restrict out) {
    v4d ag = {0}, aw = {0}, ad = {0}, wj, pj, gj, d;
    Py_ssize_t j = 0, body = m - m % 4;
    for (; j < body; j += 4) {
        LOAD(wj, w + j);
        LOAD(pj, p + j);
        STORE(p + j, wj);
        d = wj - pj;
        aw += wj * wj;
        ad += d * d;
        if (g) {
            LOAD(gj, g + j);
            ag += gj * gj;
        }
    }
    double sg = 0.0, sw = 0.0, sd = 0.0;
    for (int l = 0; l < 4; ++l) {
        sg += ag[l];
        sw += aw[l];
        sd += ad[l];
    }
    for (; j < m; ++j) {
        double wv = w[j], dv = wv - p[j];
        p[j] = wv;
        sw += wv * wv;
        sd += dv * dv;
        if (g) sg += g[j] * g[j];
    }
    out[0] = sg;
    out[1] = sw;
    out[2] = sd;
}

static PyObject *s_grad, *s_is_cpu, *s_dtype, *s_is_contiguous, *s_numel, *s_data_ptr;

static int attr_is(PyObject *obj, PyObject *name, PyObject *expected) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (!v) {
        PyErr_Clear();
        return 0;
    }
    int same = v == expected;
    Py_DECREF(v);
    return same;
}

/* obj.name() is True */
static int call_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_CallMethodNoArgs(obj, name);
    if (!v) {
        PyErr_Clear();
        return 0;
    }
    int ok = v == Py_True;
    Py_DECREF(v);
    return ok;
}

/* obj.name() == m */
static int call_equals(PyObject *obj, PyObject *name, Py_ssize_t m) {
    PyObject *v = PyObject_CallMethodNoArgs(obj, name);
    if (!v) {
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t got = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    if (got == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return got == m;
}

static const void *address_of(PyObject *t, int *ok) {
    PyObject *v = PyObject_CallMethodNoArgs(t, s_data_ptr);
    if (!v) {
        PyErr_Clear();
        *ok = 0;
        return NULL;
    }
    const void *addr = PyLong_AsVoidPtr(v);
    Py_DECREF(v);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        *ok = 0;
    }
    return addr;
}

/* The data address of ``t`` and *ok = 1 if it is a dense, contiguous CPU tensor of ``dtype`` with ``m``
 * elements (checked through the tensor's own Python attributes), else *ok = 0; no Python error is left
 * set. ``is_contiguous()`` is False (sparse COO) or raises (other layouts) for every non-strided tensor. */
static const void *plain_address(PyObject *t, PyObject *dtype, Py_ssize_t m, int *ok) {
    *ok = 0;
    if (!attr_is(t, s_is_cpu, Py_True) || !attr_is(t, s_dtype, dtype) || !call_true(t, s_is_contiguous) ||
        !call_equals(t, s_numel, m))
        return NULL;
    *ok = 1;
    const void *addr = address_of(t, ok);
    *ok = *ok && (addr != NULL || m == 0);
    return addr;
}

/* step_norms(params, sizes, known, prev, out, itemsize, dtype) -> bool
 *   params    tuple of n tensors (the parameters; their ``.grad`` is read, None counts as zero)
 *   sizes     tuple of n element counts
 *   known     list of n ints: the weight addresses checked before (0: none yet); a weight whose
 *             ``data_ptr()`` is still that address is not checked again (its tensor was replaced
 *             otherwise), a new address is checked and stored
 *   prev, out addresses (see the top of this file); itemsize 4 (float32) or 8 (float64)
 *   dtype     the torch dtype every weight and gradient must have
 * Gradients are new tensors after every backward and are checked every step. Returns False,
 * touching no memory, when a weight or gradient is not a dense contiguous CPU tensor of that dtype
 * and size; the caller then takes its PyTorch path. */
static PyObject *step_norms(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "step_norms(params, sizes, known, prev, out, itemsize, dtype) takes 7 arguments");
        return NULL;
    }
    PyObject *params = args[0], *sizes = args[1], *known = args[2], *dtype = args[6];
    if (!PyTuple_Check(params) || !PyTuple_Check(sizes) || !PyList_Check(known) ||
        PyTuple_GET_SIZE(params) != PyTuple_GET_SIZE(sizes) || PyList_GET_SIZE(known) != PyTuple_GET_SIZE(sizes)) {
        PyErr_SetString(PyExc_TypeError, "params and sizes must be tuples and known a list, all of the same length");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(params);
    char *prev = (char *)PyLong_AsVoidPtr(args[3]);
    double *out = (double *)PyLong_AsVoidPtr(args[4]);
    long itemsize = PyLong_AsLong(args[5]);
    if (PyErr_Occurred()) return NULL;
    if (!prev || !out || (itemsize != 4 && itemsize != 8)) {
        PyErr_SetString(PyExc_ValueError, "prev and out must be non-null addresses and itemsize 4 or 8");
        return NULL;
    }
    /* per call (not static): another thread may run this function while the GIL is released */
    size_t slots = (size_t)(n ? n : 1);
    const void **gp = PyMem_Malloc(2 * slots * sizeof(void *));
    Py_ssize_t *mp = PyMem_Malloc(slots * sizeof(Py_ssize_t));
    PyObject **held = PyMem_Calloc(slots, sizeof(PyObject *)); /* the gradients, alive until the pass ends */
    if (!gp || !mp || !held) {
        PyMem_Free(gp);
        PyMem_Free(mp);
        PyMem_Free(held);
        return PyErr_NoMemory();
    }
    const void **wp = gp + n;
    int ok = 1;
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
        PyObject *param = PyTuple_GET_ITEM(params, i);
        mp[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(sizes, i));
        if (mp[i] < 0) {
            if (PyErr_Occurred()) PyErr_Clear();
            ok = 0;
            break;
        }
        wp[i] = address_of(param, &ok);
        if (!ok) break;
        if (wp[i] != PyLong_AsVoidPtr(PyList_GET_ITEM(known, i)) || wp[i] == NULL) {
            if (PyErr_Occurred()) PyErr_Clear();
            wp[i] = plain_address(param, dtype, mp[i], &ok);
            if (!ok) break;
            PyObject *addr = PyLong_FromVoidPtr((void *)wp[i]);
            if (!addr || PyList_SetItem(known, i, addr) < 0) {
                PyErr_Clear();
                ok = 0;
                break;
            }
        }
        PyObject *grad = PyObject_GetAttr(param, s_grad);
        if (!grad) {
            PyErr_Clear();
            ok = 0;
            break;
        }
        held[i] = grad;
        gp[i] = grad == Py_None ? NULL : plain_address(grad, dtype, mp[i], &ok);
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        Py_ssize_t off = 0;
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (itemsize == 4)
                pass_f32((const float *)gp[i], (const float *)wp[i], (float *)prev + off, mp[i], out + 3 * i);
            else
                pass_f64((const double *)gp[i], (const double *)wp[i], (double *)prev + off, mp[i], out + 3 * i);
            off += mp[i];
        }
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < n; ++i) Py_XDECREF(held[i]);
    PyMem_Free(held);
    PyMem_Free(gp);
    PyMem_Free(mp);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"step_norms", (PyCFunction)(void (*)(void))step_norms, METH_FASTCALL,
     "step_norms(params, sizes, known, prev, out, itemsize, dtype) -> bool: squared gradient, weight and "
     "update norms per tensor in one pass (prev is overwritten with the weights); False, with nothing "
     "touched, when a tensor is not a dense contiguous CPU tensor of that dtype and size."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastnorms", "Per-step norms in one C pass.", -1, methods};

PyMODINIT_FUNC PyInit__fastnorms(void) {
    s_grad = PyUnicode_InternFromString("grad");
    s_is_cpu = PyUnicode_InternFromString("is_cpu");
    s_dtype = PyUnicode_InternFromString("dtype");
    s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    s_numel = PyUnicode_InternFromString("numel");
    s_data_ptr = PyUnicode_InternFromString("data_ptr");
    if (!s_grad || !s_is_cpu || !s_dtype || !s_is_contiguous || !s_numel || !s_data_ptr) return NULL;
    return PyModule_Create(&module);
}
