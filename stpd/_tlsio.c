/* The per-record loop of TLSConnection (stpd/tlsconn.py), in C.
 *
 * Python called SSL_read/SSL_write once per TLS record (16 KiB): 64 calls
 * and their interpreter overhead per MiB. These two functions run the same
 * loop over a whole buffer with the GIL released.
 *
 * Given a socket (fd >= 0), they also wait for it with poll() when OpenSSL
 * wants to read or write: SBC and STPD's transfer threads move a whole
 * body this way, without a trip through the trio loop per wake-up. A
 * signal ends the wait (INTERRUPTED), so that Python can run its handler
 * (Ctrl-C in sbc) before it calls again. EINTR alone misses a signal that
 * arrives just before poll() begins, or in another thread: with a wake fd
 * (the reading end of Python's signal.set_wakeup_fd pipe, set_wake_fd),
 * poll() watches it too. Without a socket (fd < 0) they return at once
 * (trio waits).
 *
 * They do no error translation: they stop at the first call that does not
 * succeed and return its result, and TLSConnection asks pyOpenSSL what it
 * means, in the same thread, so OpenSSL's (per-thread) error queue is
 * still intact.
 *
 * OpenSSL is reached through the function addresses of the library
 * pyOpenSSL already uses (cryptography's bindings, given to bind()), so
 * this needs no OpenSSL headers and always calls the same OpenSSL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <time.h>
#include <unistd.h>

typedef int (*ssl_read_fn)(void *ssl, void *buf, int num);
typedef int (*ssl_write_fn)(void *ssl, const void *buf, int num);
typedef int (*ssl_get_error_fn)(const void *ssl, int ret);

static int wake_fd = -1; /* see set_wake_fd */
static ssl_read_fn ssl_read;
static ssl_write_fn ssl_write;
static ssl_get_error_fn ssl_get_error;

/* OpenSSL's SSL_ERROR_WANT_READ and SSL_ERROR_WANT_WRITE (stable ABI). */
#define WANT_READ 2
#define WANT_WRITE 3

/* What a wait ended with (the third item of each result). */
#define READY 0     /* nothing waited for, or the socket is ready again */
#define TIMED_OUT 1 /* poll timed out: the peer stalled */
#define READABLE 2  /* write_from(watch_input): the peer sent something */
#define INTERRUPTED 3 /* a signal: Python runs its handler (Ctrl-C) before a retry */

static PyObject *bind(PyObject *self, PyObject *args)
{
    unsigned long long read_address, write_address, error_address;
    if (!PyArg_ParseTuple(args, "KKK:bind", &read_address, &write_address, &error_address))
        return NULL;
    ssl_read = (ssl_read_fn)(uintptr_t)read_address;
    ssl_write = (ssl_write_fn)(uintptr_t)write_address;
    ssl_get_error = (ssl_get_error_fn)(uintptr_t)error_address;
    Py_RETURN_NONE;
}

/* set_wake_fd(fd): a non-blocking fd that becomes readable when a signal
 * arrives (-1: none); the waits end when it does, and drain it. */
static PyObject *set_wake_fd(PyObject *self, PyObject *args)
{
    if (!PyArg_ParseTuple(args, "i:set_wake_fd", &wake_fd))
        return NULL;
    Py_RETURN_NONE;
}

/* After a call returned `result` <= 0: wait for the socket when OpenSSL
 * wants it. Returns 1 to try again, 0 to stop (`*waited` says why). Called
 * without the GIL. */
static int wait_for_socket(void *ssl, int result, int fd, int timeout_ms, int watch_input, int *waited)
{
    if (fd < 0)
        return 0;
    int error = ssl_get_error(ssl, result);
    if (error != WANT_READ && error != WANT_WRITE)
        return 0;
    struct pollfd p[2] = {
        {.fd = fd, .events = error == WANT_READ ? POLLIN : POLLOUT},
        {.fd = wake_fd, .events = POLLIN},
    };
    if (watch_input)
        p[0].events |= POLLIN;
    int ready = poll(p, wake_fd >= 0 ? 2 : 1, timeout_ms);
    if (ready > 0 && wake_fd >= 0 && (p[1].revents & POLLIN)) {
        char sink[64];
        while (read(wake_fd, sink, sizeof sink) > 0)
            ;
        *waited = INTERRUPTED;
        return 0;
    }
    if (ready < 0 && errno == EINTR) {
        *waited = INTERRUPTED;
        return 0;
    }
    if (ready == 0) {
        *waited = TIMED_OUT;
        return 0;
    }
    if (watch_input && (p[0].revents & POLLIN) && error == WANT_WRITE) {
        *waited = READABLE;
        return 0;
    }
    return 1; /* ready, or an error OpenSSL will report on the next call */
}

/* write_from(watch_input) looks for an answer before its first write, and
 * again after a pause this long since the last one began: this process was
 * stopped or the machine suspended, and the peer may have given up on us
 * and answered meanwhile (a check per record would cost a system call per
 * 16 KiB). */
#define PAUSE_NS 100000000LL /* 0.1 s */

static long long monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int peer_has_sent(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, 0) > 0;
}

static int chunk(Py_ssize_t left)
{
    return left > INT_MAX ? INT_MAX : (int)left;
}

/* read_into(ssl, buffer, offset, fd=-1, timeout_ms=-1)
 *   -> (bytes read, last SSL_read result, waited)
 * Fills buffer[offset:] with decrypted records until it is full (result 1)
 * or SSL_read returns <= 0 (WANT_READ when the socket is drained, EOF, an
 * error); that result is returned for SSL_get_error. With a socket, it
 * waits (poll) while nothing at all was read yet. */
static PyObject *read_into(PyObject *self, PyObject *args)
{
    unsigned long long ssl_address;
    Py_buffer view;
    Py_ssize_t offset, filled = 0;
    int fd = -1, timeout_ms = -1, result = 1, waited = READY;
    if (!PyArg_ParseTuple(args, "Kw*n|ii:read_into", &ssl_address, &view, &offset, &fd, &timeout_ms))
        return NULL;
    if (ssl_read == NULL || offset < 0 || offset > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "read_into: not bound, or offset outside the buffer");
        return NULL;
    }
    void *ssl = (void *)(uintptr_t)ssl_address;
    char *start = (char *)view.buf + offset;
    Py_ssize_t room = view.len - offset;
    Py_BEGIN_ALLOW_THREADS
    while (filled < room) {
        result = ssl_read(ssl, start + filled, chunk(room - filled));
        if (result > 0) {
            filled += result;
            continue;
        }
        if (filled > 0 || !wait_for_socket(ssl, result, fd, timeout_ms, 0, &waited))
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("nii", filled, result, waited);
}

/* write_from(ssl, buffer, fd=-1, timeout_ms=-1, watch_input=0)
 *   -> (bytes written, last SSL_write result, waited)
 * Encrypts and sends the buffer record by record until all of it is sent
 * (result 1) or SSL_write returns <= 0 (WANT_WRITE when the socket buffer
 * is full, an error). With a socket, it waits (poll) until it can go on;
 * with watch_input, it also stops when the peer sends something (an early
 * answer), and looks for one before it writes at all: the peer may have
 * answered while we were not sending (a source that stalled made it give
 * up), and once a write has failed on its closed socket, OpenSSL reads no
 * more. A retry must pass the same bytes again, from where this stopped. */
static PyObject *write_from(PyObject *self, PyObject *args)
{
    unsigned long long ssl_address;
    Py_buffer view;
    Py_ssize_t written = 0;
    int fd = -1, timeout_ms = -1, watch_input = 0, result = 1, waited = READY;
    if (!PyArg_ParseTuple(args, "Ky*|iip:write_from", &ssl_address, &view, &fd, &timeout_ms, &watch_input))
        return NULL;
    if (ssl_write == NULL) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "write_from: not bound");
        return NULL;
    }
    void *ssl = (void *)(uintptr_t)ssl_address;
    const char *start = (const char *)view.buf;
    Py_BEGIN_ALLOW_THREADS
    long long began = 0; /* when the last SSL_write began; 0: none yet */
    while (written < view.len) {
        if (watch_input && fd >= 0) {
            long long now = monotonic_ns();
            if ((began == 0 || now - began > PAUSE_NS) && peer_has_sent(fd)) {
                result = 0;
                waited = READABLE;
                break;
            }
            began = now;
        }
        result = ssl_write(ssl, start + written, chunk(view.len - written));
        if (result > 0) {
            written += result;
            continue;
        }
        if (!wait_for_socket(ssl, result, fd, timeout_ms, watch_input, &waited))
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("nii", written, result, waited);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(SSL_read, SSL_write, SSL_get_error addresses)"},
    {"set_wake_fd", set_wake_fd, METH_VARARGS, "set_wake_fd(fd): a signal's wake-up pipe, or -1"},
    {"read_into", read_into, METH_VARARGS,
     "read_into(ssl, buffer, offset, fd=-1, timeout_ms=-1) -> (read, result, waited)"},
    {"write_from", write_from, METH_VARARGS,
     "write_from(ssl, buffer, fd=-1, timeout_ms=-1, watch_input=False) -> (written, result, waited)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tlsio", "The per-record TLS loop of stpd.tlsstream.", -1, methods,
};

PyMODINIT_FUNC PyInit__tlsio(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL || PyModule_AddIntConstant(m, "READY", READY) < 0 ||
        PyModule_AddIntConstant(m, "TIMED_OUT", TIMED_OUT) < 0 ||
        PyModule_AddIntConstant(m, "READABLE", READABLE) < 0 ||
        PyModule_AddIntConstant(m, "INTERRUPTED", INTERRUPTED) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
