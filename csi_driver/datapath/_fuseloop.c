/* The FUSE request loop of the node data path, with a fast path for granted grains.
 *
 * Worker threads read requests from one /dev/fuse descriptor. A READ or WRITE whose whole range lies in grains
 * the engine has granted for that node (csi_driver/engine/bypass.py, B1-B4) is served here with pread/pwrite on
 * the volume's own data file, without the GIL. Every other request is handed, whole, to a Python callable
 * (with the GIL), whose return value (bytes, or None for no reply) is written back.
 *
 * Revocation (B3): a node's grant carries an `enabled` flag and an in-flight counter. A worker increments the
 * counter, then checks the flag; `revoke` clears the flag, then waits for the counter to reach zero. So once
 * revoke returns, no fast request of the node is running and none can start until the next grant.
 *
 * Stop: the descriptor is non-blocking and every worker polls it with a timeout, so `stop` ends the workers
 * without unmounting or closing anything: a successor process can take the same connection over.
 */
#define _GNU_SOURCE  /* sync_file_range */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define OP_READ 15
#define OP_WRITE 16
#define IN_HEADER 40
#define OUT_HEADER 16
#define RW_IN 40            /* fuse_read_in / fuse_write_in */
#define MAX_NODES 65536     /* node ids beyond go the slow way */
#define NBUCKETS 16         /* FUSE_BUCKETS in fuse_export.py, plus +Inf */
/* as the engine's FileIO: large writes start writeback every WRITEBACK_CHUNK bytes (never waited for), so the
 * dirty backlog of a streaming write stays small; fdatasync at flush still gives durability */
#define STREAM_WRITE (256u << 10)
#define WRITEBACK_CHUNK (8ull << 20)

static const double BOUNDS[NBUCKETS - 1] = {1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                                            1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0};

typedef struct {
    int enabled;                 /* atomic */
    long inflight;               /* atomic */
    int dirty;                   /* atomic: fast writes since take_dirty */
    int fd;
    uint64_t size;
    unsigned grain_shift;
    uint8_t *rmask, *wmask;      /* bit g: byte g >> 3, bit g & 7 */
    uint64_t ngrains;
    pthread_mutex_t stream_lock; /* the streamed range below */
    uint64_t stream_low, stream_high, streamed;
} node_t;

typedef struct {
    uint64_t count, errors, bytes, ns;
    uint64_t buckets[NBUCKETS];
} series_t;

typedef struct {
    PyObject_HEAD
    int fd;
    size_t bufsize;
    int nthreads;
    PyObject *handler;
    pthread_t *threads;
    int running;
    int stop;                    /* atomic */
    node_t *nodes[MAX_NODES];
    pthread_mutex_t nodes_lock;  /* allocation of node slots */
    series_t fast[2];            /* read, write: updated with atomics */
    uint64_t slow_calls;
    int last_error;              /* errno that ended a worker, 0 if none */
} Loop;

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void observe(series_t *s, uint64_t ns, uint64_t nbytes) {
    double sec = (double)ns / 1e9;
    int i = 0;
    while (i < NBUCKETS - 1 && sec > BOUNDS[i]) i++;
    __atomic_fetch_add(&s->count, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->bytes, nbytes, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->ns, ns, __ATOMIC_RELAXED);
    __atomic_fetch_add(&s->buckets[i], 1, __ATOMIC_RELAXED);
}

static int write_all(int fd, struct iovec *iov, int n) {
    for (;;) {
        ssize_t r = writev(fd, iov, n);
        if (r >= 0) return 0;
        if (errno == EINTR) continue;
        return -errno;   /* ENOENT: the request was interrupted and is gone; nothing to do */
    }
}

static int reply_error(int fd, uint64_t unique, int err) {
    uint8_t h[OUT_HEADER];
    uint32_t len = OUT_HEADER;
    int32_t e = -err;
    memcpy(h, &len, 4);
    memcpy(h + 4, &e, 4);
    memcpy(h + 8, &unique, 8);
    struct iovec iov = {h, OUT_HEADER};
    return write_all(fd, &iov, 1);
}

/* true when every grain of [off, off+len) is set in mask */
static int granted(const node_t *n, const uint8_t *mask, uint64_t off, uint64_t len) {
    uint64_t g = off >> n->grain_shift, last = (off + len - 1) >> n->grain_shift;
    if (last >= n->ngrains) return 0;
    for (; g <= last; g++)
        if (!(__atomic_load_n(&mask[g >> 3], __ATOMIC_ACQUIRE) & (1u << (g & 7)))) return 0;
    return 1;
}

static void start_writeback(node_t *n, uint64_t off, uint64_t len) {
    uint64_t low, high;
    pthread_mutex_lock(&n->stream_lock);
    if (n->streamed == 0) {
        n->stream_low = off;
        n->stream_high = off + len;
    } else {
        if (off < n->stream_low) n->stream_low = off;
        if (off + len > n->stream_high) n->stream_high = off + len;
    }
    n->streamed += len;
    int go = n->streamed >= WRITEBACK_CHUNK;
    low = n->stream_low;
    high = n->stream_high;
    if (go) n->streamed = 0;
    pthread_mutex_unlock(&n->stream_lock);
    if (go) sync_file_range(n->fd, (off_t)low, (off_t)(high - low), SYNC_FILE_RANGE_WRITE);
}

/* Serve a READ or WRITE from the node's file if granted. 1: answered here; 0: not granted (slow path). */
static int fast(Loop *self, const uint8_t *req, size_t n, uint8_t *data) {
    uint32_t opcode;
    uint64_t unique, nodeid, offset;
    uint32_t size;
    memcpy(&opcode, req + 4, 4);
    memcpy(&unique, req + 8, 8);
    memcpy(&nodeid, req + 16, 8);
    if (n < IN_HEADER + RW_IN || nodeid >= MAX_NODES) return 0;
    node_t *nd = self->nodes[nodeid];
    if (nd == NULL) return 0;
    memcpy(&offset, req + IN_HEADER + 8, 8);
    memcpy(&size, req + IN_HEADER + 16, 4);
    if (size == 0) return 0;
    uint64_t t0 = now_ns();
    __atomic_fetch_add(&nd->inflight, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&nd->enabled, __ATOMIC_SEQ_CST) || offset + size > nd->size || offset + size < offset) {
        __atomic_fetch_sub(&nd->inflight, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    int is_write = opcode == OP_WRITE;
    if (!granted(nd, is_write ? nd->wmask : nd->rmask, offset, size) ||
        (is_write && n < (size_t)IN_HEADER + RW_IN + size)) {
        __atomic_fetch_sub(&nd->inflight, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    uint8_t h[OUT_HEADER + 8];
    int32_t err = 0;
    uint32_t len = OUT_HEADER;
    struct iovec iov[2];
    int niov = 1;
    size_t done = 0;
    if (is_write) {
        const uint8_t *src = req + IN_HEADER + RW_IN;
        while (done < size) {
            ssize_t r = pwrite(nd->fd, src + done, size - done, (off_t)(offset + done));
            if (r < 0) {
                if (errno == EINTR) continue;
                err = errno;
                break;
            }
            done += (size_t)r;
        }
        if (done > 0) __atomic_store_n(&nd->dirty, 1, __ATOMIC_SEQ_CST);
        if (!err && size >= STREAM_WRITE) start_writeback(nd, offset, size);
    } else {
        while (done < size) {
            ssize_t r = pread(nd->fd, data + done, size - done, (off_t)(offset + done));
            if (r < 0) {
                if (errno == EINTR) continue;
                err = errno;
                break;
            }
            if (r == 0) {  /* past the file's end: the volume reads as zeros there */
                memset(data + done, 0, size - done);
                done = size;
                break;
            }
            done += (size_t)r;
        }
    }
    __atomic_fetch_sub(&nd->inflight, 1, __ATOMIC_SEQ_CST);
    series_t *s = &self->fast[is_write];
    if (err) {
        /* let the engine's own path answer (it reports and maps the error) */
        return 0;
    }
    if (is_write) {
        uint32_t wsize = size, pad = 0;
        len = OUT_HEADER + 8;
        memcpy(h + OUT_HEADER, &wsize, 4);
        memcpy(h + OUT_HEADER + 4, &pad, 4);
    } else {
        len = OUT_HEADER + size;
        iov[1].iov_base = data;
        iov[1].iov_len = size;
        niov = 2;
    }
    memcpy(h, &len, 4);
    memcpy(h + 4, &err, 4);
    memcpy(h + 8, &unique, 8);
    iov[0].iov_base = h;
    iov[0].iov_len = is_write ? OUT_HEADER + 8 : OUT_HEADER;
    observe(s, now_ns() - t0, size);  /* before the reply: a request is counted once it is acknowledged */
    write_all(self->fd, iov, niov);
    return 1;
}

/* Hand a request to Python; write what it returns. */
static void slow(Loop *self, const uint8_t *req, size_t n) {
    uint64_t unique;
    memcpy(&unique, req + 8, 8);
    PyGILState_STATE st = PyGILState_Ensure();
    __atomic_fetch_add(&self->slow_calls, 1, __ATOMIC_RELAXED);
    PyObject *arg = PyBytes_FromStringAndSize((const char *)req, (Py_ssize_t)n);
    PyObject *res = arg ? PyObject_CallOneArg(self->handler, arg) : NULL;
    Py_XDECREF(arg);
    if (res == NULL) {
        PyErr_WriteUnraisable(self->handler);
        PyGILState_Release(st);
        reply_error(self->fd, unique, EIO);
        return;
    }
    if (res != Py_None && PyBytes_Check(res)) {
        char *buf;
        Py_ssize_t len;
        PyBytes_AsStringAndSize(res, &buf, &len);
        struct iovec iov = {buf, (size_t)len};
        Py_BEGIN_ALLOW_THREADS
        write_all(self->fd, &iov, 1);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(res);
    PyGILState_Release(st);
}

static void *worker(void *arg) {
    Loop *self = (Loop *)arg;
    uint8_t *buf = malloc(self->bufsize), *data = malloc(self->bufsize);
    if (buf == NULL || data == NULL) {
        free(buf);
        free(data);
        self->last_error = ENOMEM;
        return NULL;
    }
    struct pollfd p = {self->fd, POLLIN, 0};
    while (!__atomic_load_n(&self->stop, __ATOMIC_SEQ_CST)) {
        int pr = poll(&p, 1, 100);
        if (pr < 0 && errno != EINTR) {
            self->last_error = errno;
            break;
        }
        if (pr <= 0) continue;
        if (p.revents & (POLLERR | POLLHUP | POLLNVAL) && !(p.revents & POLLIN)) {
            self->last_error = ENODEV;
            break;
        }
        ssize_t n = read(self->fd, buf, self->bufsize);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ENOENT) continue;  /* another worker took it */
            self->last_error = errno;  /* ENODEV: unmounted or aborted */
            break;
        }
        if ((size_t)n < IN_HEADER) continue;
        uint32_t opcode;
        memcpy(&opcode, buf + 4, 4);
        if ((opcode == OP_READ || opcode == OP_WRITE) && fast(self, buf, (size_t)n, data)) continue;
        if (Py_IsInitialized()) slow(self, buf, (size_t)n);
    }
    free(buf);
    free(data);
    return NULL;
}

/* ------------------------------------------------------------------ Python methods */

static int Loop_init(Loop *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fd", "handler", "bufsize", "threads", NULL};
    int fd, nthreads = 4;
    Py_ssize_t bufsize;
    PyObject *handler;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iOn|i", kwlist, &fd, &handler, &bufsize, &nthreads)) return -1;
    if (!PyCallable_Check(handler) || bufsize < 8192 || nthreads < 1 || nthreads > 256) {
        PyErr_SetString(PyExc_ValueError, "bad handler, bufsize or threads");
        return -1;
    }
    self->fd = fd;
    self->bufsize = (size_t)bufsize;
    self->nthreads = nthreads;
    Py_INCREF(handler);
    Py_XSETREF(self->handler, handler);
    pthread_mutex_init(&self->nodes_lock, NULL);
    return 0;
}

static PyObject *Loop_start(Loop *self, PyObject *unused) {
    if (self->running) Py_RETURN_NONE;
    int fl = fcntl(self->fd, F_GETFL);
    if (fl < 0 || fcntl(self->fd, F_SETFL, fl | O_NONBLOCK) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    self->threads = calloc((size_t)self->nthreads, sizeof(pthread_t));
    if (self->threads == NULL) return PyErr_NoMemory();
    __atomic_store_n(&self->stop, 0, __ATOMIC_SEQ_CST);
    self->last_error = 0;
    for (int i = 0; i < self->nthreads; i++) {
        int e = pthread_create(&self->threads[i], NULL, worker, self);
        if (e) {
            __atomic_store_n(&self->stop, 1, __ATOMIC_SEQ_CST);
            Py_BEGIN_ALLOW_THREADS
            for (int j = 0; j < i; j++) pthread_join(self->threads[j], NULL);
            Py_END_ALLOW_THREADS
            free(self->threads);
            self->threads = NULL;
            errno = e;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    self->running = 1;
    Py_RETURN_NONE;
}

static PyObject *Loop_stop(Loop *self, PyObject *unused) {
    if (!self->running) Py_RETURN_NONE;
    __atomic_store_n(&self->stop, 1, __ATOMIC_SEQ_CST);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < self->nthreads; i++) pthread_join(self->threads[i], NULL);
    Py_END_ALLOW_THREADS
    free(self->threads);
    self->threads = NULL;
    self->running = 0;
    Py_RETURN_NONE;
}

static PyObject *Loop_alive(Loop *self, PyObject *unused) {
    /* running and no worker has ended on an error */
    return PyBool_FromLong(self->running && self->last_error == 0);
}

static node_t *get_node(Loop *self, unsigned long long id) {
    if (id >= MAX_NODES) return NULL;
    pthread_mutex_lock(&self->nodes_lock);
    node_t *n = self->nodes[id];
    if (n == NULL) {
        n = calloc(1, sizeof(node_t));
        if (n) {
            n->fd = -1;
            pthread_mutex_init(&n->stream_lock, NULL);
            __atomic_store_n(&self->nodes[id], n, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&self->nodes_lock);
    return n;
}

static void drain(node_t *n) {
    __atomic_store_n(&n->enabled, 0, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&n->inflight, __ATOMIC_SEQ_CST) > 0) {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
    }
}

static PyObject *Loop_grant(Loop *self, PyObject *args) {
    unsigned long long id, size, grain;
    int fd;
    Py_buffer r, w;
    if (!PyArg_ParseTuple(args, "KiKKy*y*", &id, &fd, &size, &grain, &r, &w)) return NULL;
    PyObject *ret = NULL;
    unsigned shift = 0;
    while ((1ull << shift) < grain && shift < 40) shift++;
    uint64_t ngrains = grain ? (size + grain - 1) / grain : 0;
    size_t nbytes = (size_t)((ngrains + 7) / 8);
    node_t *n = get_node(self, id);
    if (grain == 0 || (1ull << shift) != grain || (size_t)r.len < nbytes || (size_t)w.len < nbytes) {
        PyErr_SetString(PyExc_ValueError, "grant: grain not a power of two or masks too short");
    } else if (n == NULL) {
        PyErr_SetString(PyExc_ValueError, "grant: node id out of range");
    } else {
        uint8_t *rm = malloc(nbytes ? nbytes : 1), *wm = malloc(nbytes ? nbytes : 1);
        if (rm == NULL || wm == NULL) {
            free(rm);
            free(wm);
            PyErr_NoMemory();
        } else {
            memcpy(rm, r.buf, nbytes);
            memcpy(wm, w.buf, nbytes);
            Py_BEGIN_ALLOW_THREADS
            drain(n);
            Py_END_ALLOW_THREADS
            free(n->rmask);
            free(n->wmask);
            n->rmask = rm;
            n->wmask = wm;
            n->fd = fd;
            n->streamed = 0;
            n->size = size;
            n->grain_shift = shift;
            n->ngrains = ngrains;
            __atomic_store_n(&n->enabled, 1, __ATOMIC_SEQ_CST);
            ret = Py_None;
            Py_INCREF(ret);
        }
    }
    PyBuffer_Release(&r);
    PyBuffer_Release(&w);
    return ret;
}

static PyObject *Loop_revoke(Loop *self, PyObject *args) {
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K", &id)) return NULL;
    node_t *n = id < MAX_NODES ? self->nodes[id] : NULL;
    if (n != NULL) {
        Py_BEGIN_ALLOW_THREADS
        drain(n);
        Py_END_ALLOW_THREADS
    }
    Py_RETURN_NONE;
}

static PyObject *Loop_unread(Loop *self, PyObject *args) {
    unsigned long long id, g;
    if (!PyArg_ParseTuple(args, "KK", &id, &g)) return NULL;
    node_t *n = id < MAX_NODES ? self->nodes[id] : NULL;
    /* the masks are only replaced while the node is drained, and unread runs under the engine lock as grants do */
    if (n != NULL && n->rmask != NULL && g < n->ngrains)
        __atomic_fetch_and(&n->rmask[g >> 3], (uint8_t)~(1u << (g & 7)), __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Loop_take_dirty(Loop *self, PyObject *args) {
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K", &id)) return NULL;
    node_t *n = id < MAX_NODES ? self->nodes[id] : NULL;
    return PyBool_FromLong(n != NULL && __atomic_exchange_n(&n->dirty, 0, __ATOMIC_SEQ_CST));
}

static PyObject *series_tuple(series_t *s) {
    PyObject *b = PyList_New(NBUCKETS);
    if (b == NULL) return NULL;
    for (int i = 0; i < NBUCKETS; i++)
        PyList_SET_ITEM(b, i, PyLong_FromUnsignedLongLong(__atomic_load_n(&s->buckets[i], __ATOMIC_RELAXED)));
    return Py_BuildValue("(KKdN)", (unsigned long long)__atomic_load_n(&s->count, __ATOMIC_RELAXED),
                         (unsigned long long)__atomic_load_n(&s->bytes, __ATOMIC_RELAXED),
                         (double)__atomic_load_n(&s->ns, __ATOMIC_RELAXED) / 1e9, b);
}

static PyObject *Loop_counters(Loop *self, PyObject *unused) {
    /* {"read": (count, bytes, seconds, buckets), "write": ..., "slow": calls} of the fast path */
    PyObject *r = series_tuple(&self->fast[0]), *w = series_tuple(&self->fast[1]);
    if (r == NULL || w == NULL) {
        Py_XDECREF(r);
        Py_XDECREF(w);
        return NULL;
    }
    return Py_BuildValue("{sNsNsK}", "read", r, "write", w, "slow",
                         (unsigned long long)__atomic_load_n(&self->slow_calls, __ATOMIC_RELAXED));
}

static void Loop_dealloc(Loop *self) {
    if (self->running) {
        __atomic_store_n(&self->stop, 1, __ATOMIC_SEQ_CST);
        Py_BEGIN_ALLOW_THREADS
        for (int i = 0; i < self->nthreads; i++) pthread_join(self->threads[i], NULL);
        Py_END_ALLOW_THREADS
        free(self->threads);
    }
    for (int i = 0; i < MAX_NODES; i++) {
        if (self->nodes[i]) {
            free(self->nodes[i]->rmask);
            free(self->nodes[i]->wmask);
            free(self->nodes[i]);
        }
    }
    Py_XDECREF(self->handler);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Loop_methods[] = {
    {"start", (PyCFunction)Loop_start, METH_NOARGS, "start the worker threads"},
    {"stop", (PyCFunction)Loop_stop, METH_NOARGS, "stop the workers (the descriptor stays open)"},
    {"alive", (PyCFunction)Loop_alive, METH_NOARGS, "running, and no worker ended on an error"},
    {"grant", (PyCFunction)Loop_grant, METH_VARARGS, "grant(node, fd, size, grain, read_mask, write_mask)"},
    {"revoke", (PyCFunction)Loop_revoke, METH_VARARGS, "revoke(node): returns when no fast I/O is in flight"},
    {"unread", (PyCFunction)Loop_unread, METH_VARARGS, "unread(node, grain): clear one read grant"},
    {"take_dirty", (PyCFunction)Loop_take_dirty, METH_VARARGS, "take_dirty(node) -> fast writes since last"},
    {"counters", (PyCFunction)Loop_counters, METH_NOARGS, "fast-path counters"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "csi_driver.datapath._fuseloop.Loop",
    .tp_basicsize = sizeof(Loop),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Loop_init,
    .tp_dealloc = (destructor)Loop_dealloc,
    .tp_methods = Loop_methods,
    .tp_doc = "FUSE worker threads over one /dev/fuse descriptor, with a fast path for granted grains",
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fuseloop", "FUSE request loop (see Loop)", -1, NULL};

PyMODINIT_FUNC PyInit__fuseloop(void) {
    if (PyType_Ready(&LoopType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&LoopType);
    if (PyModule_AddObject(m, "Loop", (PyObject *)&LoopType) < 0) {
        Py_DECREF(&LoopType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
