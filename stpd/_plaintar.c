/* Runs of plain tar members, in C: the files a restore makes (make_files)
 * and a backup stores (pack_files), and the headers stpd checks as an
 * upload arrives (scan_members). In Python each small file cost more than
 * its system calls several times over, and a home directory is mostly
 * small files, a directory's files one after another. Each function takes
 * such a run for as long as every member is plain, and leaves anything
 * else, a failed system call included, to the Python way, which then meets
 * the same case and does what it always did (reports, keeps, refuses). So
 * they make, store and accept nothing that Python would not, nor
 * differently.
 *
 * make_files (see sbc/extract.py, _Extraction._make_run). Restoring a small
 * file took about 18 us of Python: tarfile's parse of its header,
 * SafeMembers' checks, and five system calls through os. make_files makes
 * the files that follow one Python made, in the same directory:
 *   - a ustar header ("ustar\0" "00") of a regular file ('0', or '\0'),
 *     its checksum right and its number fields plain octal (what
 *     stpd.tarcheck._plain_fields takes), whole in the piece with its data;
 *   - its name is the directory's (given) and one component more: no '/',
 *     not "." or "..";
 *   - its mode has no set-id bits (Python names the files it leaves without);
 *   - as root, the same owner fields as the file Python made (whose owner
 *     SafeMembers looked up: uid and gid are its answer).
 * Each is made as _Extraction._make_file makes it: created with
 * O_EXCL|O_NOFOLLOW relative to the directory's descriptor, mode 0600 until
 * fchmod, written, given owner (as root), mode and time, and closed. After
 * a failed call it removes the file it created, so that Python's way makes
 * it again and reports what it finds (an existing file is kept, a name the
 * file system refuses is reported, a full disk stops the restore). It holds
 * no Python object while it works, and releases the GIL: the restore's
 * hashing thread runs meanwhile.
 *
 * pack_files (see sbc/archive.py, TreeWriter.take_files). Backing up a small
 * file took about 8 us, 5 of them Python around its system calls. pack_files
 * stores the files of a directory's listing that follow one another, each
 * as TreeWriter.add stores it, while each is plain: a regular file with one
 * link, the mode, owner and group of the last file Python stored (whose
 * header template it is given), no extended attributes to store and no
 * holes, a name in ASCII that fits the header with its directory's, a size
 * and time that fit, and room for it all in the batch. A file that changed
 * while read (shorter than its stat said, or its size or times moved) is
 * left to Python too, which reads and reports it as it does. It holds the GIL: it reads the names from their
 * list.
 *
 * scan_members (see stpd/tarcheck.py, TarStreamCheck.feed). stpd checks the
 * framing of every upload: each header's checksum, type and size, to find
 * the next. That took 3.4 us a member in Python, in the thread that
 * receives the upload, which a backup of small files then waited for.
 * scan_members passes the headers of a
 * piece that _type_and_size would take (checksum right, octal fields), of
 * members that are not extensions (PAX, GNU long names), old GNU sparse
 * files nor the old-style regular type, and stops at any other, at the end-of-archive block, and
 * at the end of the piece.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/xattr.h>
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

/* The header's checksum as tar computes it: its bytes, the checksum field's
 * counted as spaces. */
static long long header_sum(const unsigned char *h)
{
    unsigned int sum = 8 * ' '; /* a loop the compiler vectorizes */
    for (int i = 0; i < BLOCK; i++)
        sum += h[i];
    for (int i = 148; i < 156; i++)
        sum -= h[i];
    return sum;
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
    if (numbers[5] != header_sum(h))
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

/* Reads exactly size bytes of fd into to; 0 if it could not (shorter, an error). */
static int read_exactly(int fd, unsigned char *to, long long size)
{
    long long done = 0;
    while (done < size) {
        ssize_t got = read(fd, to + done, (size_t)(size - done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return 0;
        done += got;
    }
    return 1;
}

/* Writes exactly size bytes of from to fd; 0 if it could not (a full disk...). */
static int write_exactly(int fd, const unsigned char *from, long long size)
{
    long long done = 0;
    while (done < size) {
        ssize_t put = write(fd, from + done, (size_t)(size - done));
        if (put < 0 && errno == EINTR)
            continue;
        if (put <= 0)
            return 0;
        done += put;
    }
    return 1;
}

/* Creates, writes and closes one file; on a failure, removes it again. */
static int make_file(int dir_fd, const struct plain_file *file, const unsigned char *data,
                     int chown_to, uid_t uid, gid_t gid)
{
    int fd = openat(dir_fd, file->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return 0;
    int whole = write_exactly(fd, data, file->size);
    if (whole) {
        /* As _set_attributes: one that cannot be set does not stop the restore. */
        if (chown_to)
            (void)fchown(fd, uid, gid);
        (void)fchmod(fd, (mode_t)(file->mode & 0777));
        struct timespec times[2] = {{(time_t)file->mtime, 0}, {(time_t)file->mtime, 0}};
        (void)futimens(fd, times);
    }
    if (close(fd) == 0 && whole)
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
        /* Set-id bits: Python restores it without them and names it
         * (sbc.extract.restored_mode). */
        if (!plain_file(h, prefix, (size_t)prefix_length, &file) || (file.mode & 06000) != 0)
            break;
        if (owner_length && (memcmp(h + 108, owner, 16) != 0 || memcmp(h + 265, owner + 16, 64) != 0))
            break;
        Py_ssize_t padded = (Py_ssize_t)((file.size + BLOCK - 1) / BLOCK * BLOCK);
        if (padded > piece.len - at - BLOCK)
            break; /* its data, or their padding, goes on in the next piece */
        if (!make_file(dir_fd, &file, h + BLOCK, owner_length != 0, uid, gid))
            break;
        at += BLOCK + padded;
        made++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&piece);
    return Py_BuildValue("nn", at, made);
}

/* Whether the file fd has extended attributes that sbc.archive.read_xattrs
 * stores (all but an SELinux label); also when they cannot be listed (in a
 * list longer than this buffer, say): Python reads them or reports why not. */
static int has_xattrs(int fd)
{
    static const char selinux[] = "security.selinux"; /* its NUL ends it in the list */
    char names[64];
    ssize_t length = flistxattr(fd, names, sizeof names);
    if (length < 0)
        return errno != ENOTSUP; /* a file system without them has none */
    return length != 0 && !(length == sizeof selinux && memcmp(names, selinux, sizeof selinux) == 0);
}

/* Whether the file fd has holes, which sbc.archive.data_regions finds and
 * TreeWriter stores as a sparse file. Looked for as there: only in a file
 * with fewer blocks than its size. Leaves the file at offset 0. */
static int has_holes(int fd, const struct stat *st)
{
    if ((long long)st->st_blocks * 512 >= st->st_size)
        return 0;
    off_t hole = lseek(fd, 0, SEEK_HOLE);
    lseek(fd, 0, SEEK_SET);
    return hole >= 0 && hole < st->st_size;
}

#define NAME_FIELD 100
#define MIDDLE_BYTES 24 /* mode, uid and gid fields */
#define TAIL_BYTES 356  /* from the type field to the end */
#define LARGEST 077777777777LL /* of a size or time in its 12-byte field */

/* pack_files(buffer, filled, dir_fd, prefix, names, first, mode, uid, gid,
 *            middle, tail, checksum) -> (packed, filled)
 * Stores names[first:], the entries of the directory dir_fd (stored under
 * prefix, its name in the archive and "/"), as tar members in buffer from
 * filled on, while each is plain (see above): a regular file of st_mode
 * mode, owner uid, group gid. middle, tail and checksum are the header
 * template of those (TreeWriter._file_header): the header's bytes from 100
 * to 124 and from 156, and their sum with the checksum field's spaces. */
static PyObject *pack_files(PyObject *self, PyObject *args)
{
    Py_buffer out;
    Py_ssize_t filled, first, prefix_length, middle_length, tail_length, packed = 0;
    const char *prefix, *middle, *tail;
    PyObject *names;
    int dir_fd;
    unsigned int mode, uid, gid;
    long long template_sum;
    if (!PyArg_ParseTuple(args, "w*niy#O!nIIIy#y#L:pack_files", &out, &filled, &dir_fd, &prefix,
                          &prefix_length, &PyList_Type, &names, &first, &mode, &uid, &gid, &middle,
                          &middle_length, &tail, &tail_length, &template_sum))
        return NULL;
    if (filled < 0 || filled > out.len || first < 0 || middle_length != MIDDLE_BYTES ||
        tail_length != TAIL_BYTES) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "pack_files: filled or first out of range, or not a template");
        return NULL;
    }
    unsigned char *buffer = out.buf;
    for (Py_ssize_t i = first; i < PyList_GET_SIZE(names); i++) {
        PyObject *name = PyList_GET_ITEM(names, i);
        if (!PyUnicode_Check(name) || !PyUnicode_IS_ASCII(name))
            break; /* a PAX header for its name: Python */
        Py_ssize_t length = PyUnicode_GET_LENGTH(name);
        const char *ascii = (const char *)PyUnicode_DATA(name);
        if (prefix_length + length > NAME_FIELD)
            break;
        /* A name of the listing has neither: it must name an entry of dir_fd,
         * not a path through another directory (or link). */
        if ((Py_ssize_t)strlen(ascii) != length || memchr(ascii, '/', (size_t)length) != NULL)
            break;
        struct stat st;
        if (fstatat(dir_fd, ascii, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode) ||
            st.st_nlink != 1 || st.st_mode != mode || st.st_uid != uid || st.st_gid != gid ||
            st.st_size > LARGEST)
            break;
        /* The whole second it falls in, as sbc.archive.whole_seconds (tv_nsec
         * is never negative, so tv_sec is that second before 1970 too). */
        long long mtime = (long long)st.st_mtim.tv_sec;
        if (mtime < 0 || mtime > LARGEST)
            break;
        long long size = st.st_size, padded = (size + BLOCK - 1) / BLOCK * BLOCK;
        if (padded > out.len - filled - BLOCK)
            break; /* Python goes on in the next batch */
        unsigned char *header = buffer + filled, *data = header + BLOCK;
        int fd = openat(dir_fd, ascii, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            break;
        if (has_xattrs(fd) || has_holes(fd, &st)) {
            close(fd);
            break; /* PAX records for them, or the sparse format: Python */
        }
        int whole = read_exactly(fd, data, size);
        /* A file whose size or times moved while it was read (it grew, or
         * was rewritten in place) is left to Python, which stores it anew
         * and says so if it is still changing: archive.changed_since. */
        struct stat after;
        int changed = !whole || fstat(fd, &after) != 0 || after.st_size != st.st_size ||
                      after.st_mtim.tv_sec != st.st_mtim.tv_sec ||
                      after.st_mtim.tv_nsec != st.st_mtim.tv_nsec ||
                      after.st_ctim.tv_sec != st.st_ctim.tv_sec ||
                      after.st_ctim.tv_nsec != st.st_ctim.tv_nsec;
        close(fd);
        if (changed)
            break;
        memset(data + size, 0, (size_t)(padded - size));
        /* As _file_header: name, the template's middle, size and time, checksum, tail. */
        memset(header, 0, NAME_FIELD);
        memcpy(header, prefix, (size_t)prefix_length);
        memcpy(header + prefix_length, ascii, (size_t)length);
        memcpy(header + NAME_FIELD, middle, MIDDLE_BYTES);
        char numbers[2 * 12 + 1];
        snprintf(numbers, sizeof numbers, "%011llo%c%011llo", size, 0, mtime);
        memcpy(header + 124, numbers, 24); /* the second field's NUL: below */
        header[147] = 0;
        memcpy(header + 156, tail, TAIL_BYTES);
        long long sum = template_sum;
        for (int at = 0; at < NAME_FIELD; at++)
            sum += header[at];
        for (int at = 124; at < 148; at++)
            sum += header[at];
        char field[8];
        snprintf(field, sizeof field, "%06llo", sum);
        memcpy(header + 148, field, 6);
        header[154] = 0;
        header[155] = ' ';
        filled += BLOCK + padded;
        packed++;
    }
    PyBuffer_Release(&out);
    return Py_BuildValue("nn", packed, filled);
}

/* scan_members(piece, at) -> (end, members)
 * Passes the plain headers (see above) that follow one another in piece
 * from at, a header's offset, and the data they announce. end: where the
 * first header not passed starts, which is past the piece when the last
 * member's data goes on in the next one. */
static PyObject *scan_members(PyObject *self, PyObject *args)
{
    Py_buffer piece;
    Py_ssize_t at, members = 0;
    if (!PyArg_ParseTuple(args, "y*n:scan_members", &piece, &at))
        return NULL;
    if (at < 0) {
        PyBuffer_Release(&piece);
        PyErr_SetString(PyExc_ValueError, "scan_members: at before the piece");
        return NULL;
    }
    const unsigned char *bytes = piece.buf;
    while (piece.len - at >= BLOCK) {
        const unsigned char *h = bytes + at;
        char kind = (char)h[156];
        long long stored, size;
        /* Not passed: extensions, whose data changes what follows; the old
         * regular type (a directory if its name ends in '/'); fields that
         * are not octal (base-256 among them). */
        /* X: Solaris's x; S: old GNU sparse, whose map may go on in blocks of its own */
        if (strchr("xXgLKS", kind) != NULL || kind == 0)
            break;
        if (octal(h + 148, 8, &stored) < 0 || octal(h + 124, 12, &size) < 0)
            break;
        /* The other number fields, which tarfile reads too (and refuses a
         * header for): mode, uid, gid, mtime, devmajor, devminor. */
        long long ignored;
        if (octal(h + 100, 8, &ignored) < 0 || octal(h + 108, 8, &ignored) < 0 ||
            octal(h + 116, 8, &ignored) < 0 || octal(h + 136, 12, &ignored) < 0 ||
            octal(h + 329, 8, &ignored) < 0 || octal(h + 337, 8, &ignored) < 0)
            break;
        if (stored != header_sum(h))
            break; /* (an empty field reads as 0: never a header's sum) */
        long long data = (kind >= '1' && kind <= '6') ? 0 : (size + BLOCK - 1) / BLOCK * BLOCK;
        at += BLOCK + (Py_ssize_t)data;
        members++;
    }
    PyBuffer_Release(&piece);
    return Py_BuildValue("nn", at, members);
}

static PyMethodDef methods[] = {
    {"make_files", make_files, METH_VARARGS,
     "make_files(piece, start, dir_fd, prefix, owner, uid, gid) -> (end, made)"},
    {"pack_files", pack_files, METH_VARARGS,
     "pack_files(buffer, filled, dir_fd, prefix, names, first, mode, uid, gid, middle, tail, "
     "checksum) -> (packed, filled)"},
    {"scan_members", scan_members, METH_VARARGS, "scan_members(piece, at) -> (end, members)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_plaintar", "Runs of plain tar members, in C.", -1, methods,
};

PyMODINIT_FUNC PyInit__plaintar(void)
{
    return PyModule_Create(&module);
}
