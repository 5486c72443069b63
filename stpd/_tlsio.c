/* The per-record loop of TLSStream, in C.
 *
 * Python called SSL_read/SSL_write once per TLS record (16 KiB): 64 calls
 * and their interpreter overhead per MiB, a third of stpd's CPU time in an
 * upload. These two functions run the same loop over a whole buffer with
 * the GIL released (the worker thread hashing and writing runs meanwhile).
 *
 * They do nothing else: no waiting, no error translation. They stop at the
 * first call that does not succeed and return its result, and TLSStream
 * asks pyOpenSSL what it means, in the same thread, so OpenSSL's
 * (per-thread) error queue is still intact.
 *
 * OpenSSL is reached through the function addresses of the library
 * pyOpenSSL already uses (cryptography's bindings, given to bind()), so
 * this needs no OpenSSL headers and always calls the same OpenSSL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>

typedef int (*ssl_read_fn)(void *ssl, void *buf, int num);
typedef int (*ssl_write_fn)(void *ssl, const void *buf, int num);

static ssl_read_fn ssl_read;
static ssl_write_fn ssl_write;

static PyObject *bind(PyObject *self, PyObject *args)
{
    unsigned long long read_address, write_address;
    if (!PyArg_ParseTuple(args, "KK:bind", &read_address, &write_address))
        return NULL;
    ssl_read = (ssl_read_fn)(uintptr_t)read_address;
    ssl_write = (ssl_write_fn)(uintptr_t)write_address;
    Py_RETURN_NONE;
}

static int chunk(Py_ssize_t left)
{
    return left > INT_MAX ? INT_MAX : (int)left;
}

/* read_into(ssl, buffer, offset) -> (bytes read, last SSL_read result)
 * Fills buffer[offset:] with decrypted records until it is full (result 1)
 * or SSL_read returns <= 0 (WANT_READ when the socket is drained, EOF, an
 * error); that result is returned for SSL_get_error. */
static PyObject *read_into(PyObject *self, PyObject *args)
{
    unsigned long long ssl_address;
    Py_buffer view;
    Py_ssize_t offset, filled = 0;
    int result = 1;
    if (!PyArg_ParseTuple(args, "Kw*n:read_into", &ssl_address, &view, &offset))
        return NULL;
    if (ssl_read == NULL || offset < 0 || offset > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "read_into: not bound, or offset outside the buffer");
        return NULL;
    }
    char *start = (char *)view.buf + offset;
    Py_ssize_t room = view.len - offset;
    Py_BEGIN_ALLOW_THREADS
    while (filled < room) {
        result = ssl_read((void *)(uintptr_t)ssl_address, start + filled, chunk(room - filled));
        if (result <= 0)
            break;
        filled += result;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("ni", filled, result);
}

/* write_from(ssl, buffer) -> (bytes written, last SSL_write result)
 * Encrypts and sends the buffer record by record until all of it is sent
 * (result 1) or SSL_write returns <= 0 (WANT_WRITE when the socket buffer
 * is full, an error). A retry after WANT_WRITE must pass the same bytes
 * again, from where this stopped. */
static PyObject *write_from(PyObject *self, PyObject *args)
{
    unsigned long long ssl_address;
    Py_buffer view;
    Py_ssize_t written = 0;
    int result = 1;
    if (!PyArg_ParseTuple(args, "Ky*:write_from", &ssl_address, &view))
        return NULL;
    if (ssl_write == NULL) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "write_from: not bound");
        return NULL;
    }
    const char *start = (const char *)view.buf;
    Py_BEGIN_ALLOW_THREADS
    while (written < view.len) {
        result = ssl_write((void *)(uintptr_t)ssl_address, start + written, chunk(view.len - written));
        if (result <= 0)
            break;
        written += result;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("ni", written, result);
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "bind(SSL_read address, SSL_write address)"},
    {"read_into", read_into, METH_VARARGS, "read_into(ssl, buffer, offset) -> (read, result)"},
    {"write_from", write_from, METH_VARARGS, "write_from(ssl, buffer) -> (written, result)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_tlsio", "The per-record TLS loop of stpd.tlsstream.", -1, methods,
};

PyMODINIT_FUNC PyInit__tlsio(void)
{
    return PyModule_Create(&module);
}
