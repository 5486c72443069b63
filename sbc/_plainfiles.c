/* A run of plain files of a restore, made in C (see sbc/extract.py).
 *
 * Restoring a small file took about 18 us of Python: tarfile's parse of
 * its header, SafeMembers' checks, and five system calls through os. A
 * saveset of a home directory is mostly such files, a directory's files
 * one after another. make_files makes those that follow a file Python
 * made, in the same directory, for as long as each one is plain:
 *   - a ustar header ("ustar\0" "00") of a regular file ('0', or '\0'),
 *     its checksum right and its number fields plain octal (what
 *     stpd.tarcheck._plain_fields takes), whole in the piece with its data;
 *   - its name is the directory's (given) and one component more: no '/',
 *     not "." or "..";
 *   - as root, the same owner fields as the file Python made (whose owner
 *     SafeMembers looked up: uid and gid are its answer).
 * Each is made as _Extraction._make_file makes it: created with
 * O_EXCL|O_NOFOLLOW relative to the directory's descriptor, mode 0600 until
 * fchmod, written, given owner (as root), mode and time, and closed.
 *
 * At anything else it stops before that member and leaves it to Python:
 * after a system call that fails too, having removed the file it created,
 * so that Python's way makes it again and reports what it finds (an
 * existing file is kept, a name the file system refuses is reported, a
 * full disk stops the restore). So it makes nothing that Python would not,
 * nor differently. It holds no Python object while it works, and releases
 * the GIL: the restore's hashing thread runs meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512
#define OWNER_BYTES 80 /* the uid and gid fields, then uname and gname */

/* A number field as _plain_fields reads it: cut at the first NUL, ASCII
 * whitespace stripped, octal digits (none: 0). Anything else (base-256, a
 * sign, an underscore) is -1: left to Python. */
static int octal(const unsigned char *field, int size, long long *value)
{
    int end = 0, begin = 0;
    while (end < size && field[end] != 0)
        end++;
    while (begin < end && (field[begin] == ' ' || (field[begin] >= '\t' && field[begin] <= '\r')))
        begin++;
    while (end > begin && (field[end - 1] == ' ' || (field[end - 1] >= '\t' && field[end - 1] <= '\r')))
        end--;
    *value = 0;
    for (int i = begin; i < end; i++) {
        if (field[i] < '0' || field[i] > '7')
            return -1;
        *value = *value * 8 + (field[i] - '0');
    }
    return 0;
}

static size_t field_length(const unsigned char *field, size_t size)
{
    const unsigned char *nul = memchr(field, 0, size);
    return nul == NULL ? size : (size_t)(nul - field);
}

struct plain_file {
    char name[BLOCK]; /* the last component, NUL-terminated */
    long long mode, size, mtime;
};

/* Whether the header at h is a plain regular file directly in the directory
 * named `prefix` (the archive's spelling, ending in '/', or empty). */
static int plain_file(const unsigned char *h, const char *prefix, size_t prefix_length,
                      struct plain_file *file)
{
    static const int number_at[8] = {100, 108, 116, 124, 136, 148, 329, 337};
    static const int number_size[8] = {8, 8, 8, 12, 12, 8, 8, 8};
    long long numbers[8];
    if (memcmp(h + 257, "ustar\0" "00", 8) != 0 || (h[156] != '0' && h[156] != 0))
        return 0;
    for (int i = 0; i < 8; i++)
        if (octal(h + number_at[i], number_size[i], &numbers[i]) < 0)
            return 0;
    long long sum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++)
        sum += (i >= 148 && i < 156) ? 0 : h[i];
    if (numbers[5] != sum)
        return 0;
    /* The member's name as tarfile joins it: prefix "/" name. */
    char full[BLOCK];
    size_t name_length = field_length(h, 100), at = field_length(h + 345, 155);
    memcpy(full, h + 345, at);
    if (at > 0)
        full[at++] = '/';
    memcpy(full + at, h, name_length);
    at += name_length;
    if (at <= prefix_length || memcmp(full, prefix, prefix_length) != 0)
        return 0;
    size_t length = at - prefix_length;
    const char *last = full + prefix_length;
    if (memchr(last, '/', length) != NULL || (length == 1 && last[0] == '.') ||
        (length == 2 && last[0] == '.' && last[1] == '.'))
        return 0;
    memcpy(file->name, last, length);
    file->name[length] = 0;
    file->mode = numbers[0];
    file->size = numbers[3];
    file->mtime = numbers[4];
    return 1;
}

/* Creates, writes and closes one file; on a failure, removes it again. */
static int make_file(int dir_fd, const struct plain_file *file, const unsigned char *data,
                     int chown_to, uid_t uid, gid_t gid)
{
    int fd = openat(dir_fd, file->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return 0;
    long long done = 0;
    while (done < file->size) {
        ssize_t written = write(fd, data + done, (size_t)(file->size - done));
        if (written < 0 && errno == EINTR)
            continue;
        if (written <= 0)
            break;
        done += written;
    }
    if (done == file->size) {
        /* As _set_attributes: one that cannot be set does not stop the restore. */
        if (chown_to)
            (void)fchown(fd, uid, gid);
        (void)fchmod(fd, (mode_t)(file->mode & 0777));
        struct timespec times[2] = {{(time_t)file->mtime, 0}, {(time_t)file->mtime, 0}};
        (void)futimens(fd, times);
    }
    if (close(fd) == 0 && done == file->size)
        return 1;
    unlinkat(dir_fd, file->name, 0);
    return 0;
}

/* make_files(piece, start, dir_fd, prefix, owner, uid, gid) -> (end, made)
 * Makes the plain files whose headers follow one another in piece from
 * start on (see above), in the directory dir_fd that the archive names
 * prefix. owner: the 80 bytes of owner fields (uid, gid, uname, gname) that
 * uid and gid answer, to chown as root; b"" to leave owners alone. end:
 * where the first member not made starts. */
static PyObject *make_files(PyObject *self, PyObject *args)
{
    Py_buffer piece;
    Py_ssize_t start, prefix_length, owner_length, made = 0;
    const char *prefix, *owner;
    int dir_fd;
    unsigned int uid, gid;
    if (!PyArg_ParseTuple(args, "y*niy#y#II:make_files", &piece, &start, &dir_fd, &prefix,
                          &prefix_length, &owner, &owner_length, &uid, &gid))
        return NULL;
    if (start < 0 || start > piece.len || (owner_length != 0 && owner_length != OWNER_BYTES)) {
        PyBuffer_Release(&piece);
        PyErr_SetString(PyExc_ValueError, "make_files: start outside the piece, or owner not 80 bytes");
        return NULL;
    }
    const unsigned char *bytes = piece.buf;
    Py_ssize_t at = start;
    Py_BEGIN_ALLOW_THREADS
    struct plain_file file;
    while (piece.len - at >= BLOCK) {
        const unsigned char *h = bytes + at;
        if (!plain_file(h, prefix, (size_t)prefix_length, &file))
            break;
        if (owner_length && (memcmp(h + 108, owner, 16) != 0 || memcmp(h + 265, owner + 16, 64) != 0))
            break;
        if (file.size > piece.len - at - BLOCK)
            break; /* its data goes on in the next piece */
        Py_ssize_t padded = (Py_ssize_t)((file.size + BLOCK - 1) / BLOCK * BLOCK);
        if (padded > piece.len - at - BLOCK)
            break;
        if (!make_file(dir_fd, &file, h + BLOCK, owner_length != 0, uid, gid))
            break;
        at += BLOCK + padded;
        made++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&piece);
    return Py_BuildValue("nn", at, made);
}

static PyMethodDef methods[] = {
    {"make_files", make_files, METH_VARARGS,
     "make_files(piece, start, dir_fd, prefix, owner, uid, gid) -> (end, made)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_plainfiles", "A run of plain files of a restore, made in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__plainfiles(void)
{
    return PyModule_Create(&module);
}
