/* readtrace: an LD_PRELOAD shim that records which byte ranges of one file a command reads.
 *
 * crashlab runs a user's check command on thousands of crash states that differ in a few blocks.
 * A deterministic command that reads the same bytes gives the same verdict, so a state whose bytes
 * at every range the command read for an earlier state are unchanged needs no run of its own
 * (crashlab/readtrace.py). That is only sound if every read of the file is seen, so the shim says
 * so when it cannot see one: the file mapped, read through stdio or sendfile, a program exec'd
 * without the shim (static, or its environment cleared), a process that died without saying so.
 *
 * Environment: CRASHLAB_TRACE_FILE names the file watched (matched by device and inode, so any
 * path or link to it counts), CRASHLAB_TRACE_LOG the log the records are appended to, one line
 * each:  C pid (a process image starts; `C pid root` for the command itself, which finds
 *        CRASHLAB_TRACE_ROOT set and unsets it)  R offset length  W (a write)  U why (untraceable)
 *        E pid (about to exec)  F pid (the exec failed)  S pid (forked or spawned a child)
 *        D pid (exit). Complete means: a root, and every process named ends in D.
 * The log is opened for each flush, never held: a program that closes every descriptor, or reuses
 * the number, must not have its own files written by the shim.
 */
#define _GNU_SOURCE
#include <alloca.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FDS 4096
#define BUF_SIZE 65536

static dev_t watch_dev;
static ino_t watch_ino;
static int watching;
static char log_path[4096];
static unsigned char traced[MAX_FDS];
static char buf[BUF_SIZE];
static size_t buf_len;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

static void flush_locked(void)
{
    static ssize_t (*real_write)(int, const void *, size_t);
    static int (*real_open)(const char *, int, ...);
    if (!real_write) real_write = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    if (!real_open) real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    if (!buf_len) return;
    int fd = real_open(log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) {
        /* One write per flush: O_APPEND writes to a regular file do not interleave. */
        (void)real_write(fd, buf, buf_len);
        close(fd);
    }
    buf_len = 0;
}

static void record(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n <= 0 || (size_t)n >= sizeof line) return;
    pthread_mutex_lock(&lock);
    if (buf_len + (size_t)n > BUF_SIZE) flush_locked();
    memcpy(buf + buf_len, line, (size_t)n);
    buf_len += (size_t)n;
    pthread_mutex_unlock(&lock);
}

static void flush(void)
{
    pthread_mutex_lock(&lock);
    flush_locked();
    pthread_mutex_unlock(&lock);
}

static void at_exit(void)
{
    record("D %d\n", (int)getpid());
    flush();
}

__attribute__((constructor)) static void start(void)
{
    const char *file = getenv("CRASHLAB_TRACE_FILE"), *log = getenv("CRASHLAB_TRACE_LOG");
    struct stat st;
    if (!file || !log || strlen(log) >= sizeof log_path || stat(file, &st) != 0) return;
    strcpy(log_path, log);
    watch_dev = st.st_dev;
    watch_ino = st.st_ino;
    watching = 1;
    /* Registered before main runs, so it runs after the program's own exit handlers. */
    atexit(at_exit);
    int root = getenv("CRASHLAB_TRACE_ROOT") != NULL;
    unsetenv("CRASHLAB_TRACE_ROOT");
    record(root ? "C %d root\n" : "C %d\n", (int)getpid());
}

static int is_watched(int fd)
{
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == watch_dev && st.st_ino == watch_ino;
}

static int on(int fd) { return watching && fd >= 0 && fd < MAX_FDS && traced[fd]; }

static void opened(int fd, int flags)
{
    if (!watching || fd < 0) return;
    if (fd >= MAX_FDS) {
        if (is_watched(fd)) record("U descriptor %d past the shim's table\n", fd);
        return;
    }
    traced[fd] = (unsigned char)is_watched(fd);
    if (traced[fd] && (flags & O_ACCMODE) != O_RDONLY) record("W\n");
}

static void read_at(off_t off, ssize_t got)
{
    if (got > 0) record("R %lld %lld\n", (long long)off, (long long)got);
}

/* --- opening and closing ------------------------------------------------------------------ */

#define OPEN_MODE(flags) \
    mode_t mode = 0; \
    if ((flags) & (O_CREAT | __O_TMPFILE)) { va_list ap; va_start(ap, flags); mode = va_arg(ap, mode_t); va_end(ap); }

int open(const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    REAL(int, open, const char *, int, ...);
    int fd = real_open(path, flags, mode);
    opened(fd, flags);
    return fd;
}

int open64(const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    REAL(int, open64, const char *, int, ...);
    int fd = real_open64(path, flags, mode);
    opened(fd, flags);
    return fd;
}

int openat(int dir, const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    REAL(int, openat, int, const char *, int, ...);
    int fd = real_openat(dir, path, flags, mode);
    opened(fd, flags);
    return fd;
}

int openat64(int dir, const char *path, int flags, ...)
{
    OPEN_MODE(flags);
    REAL(int, openat64, int, const char *, int, ...);
    int fd = real_openat64(dir, path, flags, mode);
    opened(fd, flags);
    return fd;
}

int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open64(path, flags); }
int __openat_2(int dir, const char *path, int flags) { return openat(dir, path, flags); }
int __openat64_2(int dir, const char *path, int flags) { return openat64(dir, path, flags); }

int creat(const char *path, mode_t mode) { return open(path, O_CREAT | O_WRONLY | O_TRUNC, mode); }
int creat64(const char *path, mode_t mode) { return open64(path, O_CREAT | O_WRONLY | O_TRUNC, mode); }

int close(int fd)
{
    REAL(int, close, int);
    if (fd >= 0 && fd < MAX_FDS) traced[fd] = 0;
    return real_close(fd);
}

static int duped(int old, int new)
{
    if (new >= 0 && new < MAX_FDS) traced[new] = 0;
    if (on(old) && new >= 0) {
        if (new < MAX_FDS) traced[new] = 1;
        else record("U descriptor %d past the shim's table\n", new);
    }
    return new;
}

int dup(int fd) { REAL(int, dup, int); return duped(fd, real_dup(fd)); }
int dup2(int fd, int to) { REAL(int, dup2, int, int); return duped(fd, real_dup2(fd, to)); }
int dup3(int fd, int to, int fl) { REAL(int, dup3, int, int, int); return duped(fd, real_dup3(fd, to, fl)); }

int fcntl(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    REAL(int, fcntl, int, int, ...);
    int r = real_fcntl(fd, cmd, arg);
    if (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) duped(fd, r);
    return r;
}

int fcntl64(int fd, int cmd, ...)
{
    va_list ap;
    va_start(ap, cmd);
    long arg = va_arg(ap, long);
    va_end(ap);
    return fcntl(fd, cmd, arg);
}

/* stdio reads through descriptors the shim cannot see inside libc: the file read that way is
 * untraced. */
static FILE *stdio_opened(FILE *f)
{
    if (watching && f && is_watched(fileno(f))) record("U read through stdio\n");
    return f;
}

FILE *fopen(const char *path, const char *how)
{
    REAL(FILE *, fopen, const char *, const char *);
    return stdio_opened(real_fopen(path, how));
}

FILE *fopen64(const char *path, const char *how)
{
    REAL(FILE *, fopen64, const char *, const char *);
    return stdio_opened(real_fopen64(path, how));
}

FILE *freopen(const char *path, const char *how, FILE *old)
{
    REAL(FILE *, freopen, const char *, const char *, FILE *);
    return stdio_opened(real_freopen(path, how, old));
}

FILE *freopen64(const char *path, const char *how, FILE *old)
{
    REAL(FILE *, freopen64, const char *, const char *, FILE *);
    return stdio_opened(real_freopen64(path, how, old));
}

FILE *fdopen(int fd, const char *how)
{
    REAL(FILE *, fdopen, int, const char *);
    if (on(fd)) record("U read through stdio\n");
    return real_fdopen(fd, how);
}

/* --- reading -------------------------------------------------------------------------------- */

ssize_t read(int fd, void *b, size_t n)
{
    REAL(ssize_t, read, int, void *, size_t);
    if (!on(fd)) return real_read(fd, b, n);
    off_t at = lseek(fd, 0, SEEK_CUR);
    ssize_t got = real_read(fd, b, n);
    if (at < 0 && got > 0) record("U read at an unknown offset\n");
    else read_at(at, got);
    return got;
}

ssize_t __read_chk(int fd, void *b, size_t n, size_t size) { (void)size; return read(fd, b, n); }

ssize_t pread(int fd, void *b, size_t n, off_t off)
{
    REAL(ssize_t, pread, int, void *, size_t, off_t);
    ssize_t got = real_pread(fd, b, n, off);
    if (on(fd)) read_at(off, got);
    return got;
}

ssize_t pread64(int fd, void *b, size_t n, off_t off)
{
    REAL(ssize_t, pread64, int, void *, size_t, off_t);
    ssize_t got = real_pread64(fd, b, n, off);
    if (on(fd)) read_at(off, got);
    return got;
}

ssize_t __pread_chk(int fd, void *b, size_t n, off_t off, size_t s) { (void)s; return pread(fd, b, n, off); }
ssize_t __pread64_chk(int fd, void *b, size_t n, off_t off, size_t s) { (void)s; return pread64(fd, b, n, off); }

ssize_t readv(int fd, const struct iovec *v, int cnt)
{
    REAL(ssize_t, readv, int, const struct iovec *, int);
    if (!on(fd)) return real_readv(fd, v, cnt);
    off_t at = lseek(fd, 0, SEEK_CUR);
    ssize_t got = real_readv(fd, v, cnt);
    if (at < 0 && got > 0) record("U read at an unknown offset\n");
    else read_at(at, got);
    return got;
}

ssize_t preadv(int fd, const struct iovec *v, int cnt, off_t off)
{
    REAL(ssize_t, preadv, int, const struct iovec *, int, off_t);
    ssize_t got = real_preadv(fd, v, cnt, off);
    if (on(fd)) read_at(off, got);
    return got;
}

ssize_t preadv64(int fd, const struct iovec *v, int cnt, off_t off)
{
    REAL(ssize_t, preadv64, int, const struct iovec *, int, off_t);
    ssize_t got = real_preadv64(fd, v, cnt, off);
    if (on(fd)) read_at(off, got);
    return got;
}

ssize_t preadv2(int fd, const struct iovec *v, int cnt, off_t off, int fl)
{
    REAL(ssize_t, preadv2, int, const struct iovec *, int, off_t, int);
    if (on(fd) && off == -1) record("U read at an unknown offset\n");
    ssize_t got = real_preadv2(fd, v, cnt, off, fl);
    if (on(fd) && off != -1) read_at(off, got);
    return got;
}

ssize_t preadv64v2(int fd, const struct iovec *v, int cnt, off_t off, int fl)
{
    REAL(ssize_t, preadv64v2, int, const struct iovec *, int, off_t, int);
    if (on(fd) && off == -1) record("U read at an unknown offset\n");
    ssize_t got = real_preadv64v2(fd, v, cnt, off, fl);
    if (on(fd) && off != -1) read_at(off, got);
    return got;
}

void *mmap(void *addr, size_t len, int prot, int fl, int fd, off_t off)
{
    REAL(void *, mmap, void *, size_t, int, int, int, off_t);
    if (on(fd)) record("U mapped\n");
    return real_mmap(addr, len, prot, fl, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int fl, int fd, off_t off)
{
    REAL(void *, mmap64, void *, size_t, int, int, int, off_t);
    if (on(fd)) record("U mapped\n");
    return real_mmap64(addr, len, prot, fl, fd, off);
}

ssize_t sendfile(int out, int in, off_t *off, size_t n)
{
    REAL(ssize_t, sendfile, int, int, off_t *, size_t);
    if (on(in)) record("U read by sendfile\n");
    if (on(out)) record("W\n");
    return real_sendfile(out, in, off, n);
}

ssize_t sendfile64(int out, int in, off_t *off, size_t n) { return sendfile(out, in, off, n); }

ssize_t copy_file_range(int in, off_t *oi, int out, off_t *oo, size_t n, unsigned fl)
{
    REAL(ssize_t, copy_file_range, int, off_t *, int, off_t *, size_t, unsigned);
    if (on(in)) record("U read by copy_file_range\n");
    if (on(out)) record("W\n");
    return real_copy_file_range(in, oi, out, oo, n, fl);
}

ssize_t splice(int in, off_t *oi, int out, off_t *oo, size_t n, unsigned fl)
{
    REAL(ssize_t, splice, int, off_t *, int, off_t *, size_t, unsigned);
    if (on(in)) record("U read by splice\n");
    if (on(out)) record("W\n");
    return real_splice(in, oi, out, oo, n, fl);
}

/* --- writing: a command that writes the file is judged, never reused ------------------------ */

#define WROTE(fd) do { if (on(fd)) record("W\n"); } while (0)

ssize_t write(int fd, const void *b, size_t n) { REAL(ssize_t, write, int, const void *, size_t); WROTE(fd); return real_write(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { REAL(ssize_t, pwrite, int, const void *, size_t, off_t); WROTE(fd); return real_pwrite(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { REAL(ssize_t, pwrite64, int, const void *, size_t, off_t); WROTE(fd); return real_pwrite64(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) { REAL(ssize_t, writev, int, const struct iovec *, int); WROTE(fd); return real_writev(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t); WROTE(fd); return real_pwritev(fd, v, c, o); }
ssize_t pwritev2(int fd, const struct iovec *v, int c, off_t o, int f) { REAL(ssize_t, pwritev2, int, const struct iovec *, int, off_t, int); WROTE(fd); return real_pwritev2(fd, v, c, o, f); }
int ftruncate(int fd, off_t n) { REAL(int, ftruncate, int, off_t); WROTE(fd); return real_ftruncate(fd, n); }
int ftruncate64(int fd, off_t n) { REAL(int, ftruncate64, int, off_t); WROTE(fd); return real_ftruncate64(fd, n); }
int fallocate(int fd, int m, off_t o, off_t n) { REAL(int, fallocate, int, int, off_t, off_t); WROTE(fd); return real_fallocate(fd, m, o, n); }
int fallocate64(int fd, int m, off_t o, off_t n) { REAL(int, fallocate64, int, int, off_t, off_t); WROTE(fd); return real_fallocate64(fd, m, o, n); }

/* --- processes: every image that runs must say it carries the shim -------------------------- */

static void before_exec(void)
{
    if (!watching) return;
    record("E %d\n", (int)getpid());
    flush();
}

static int after_exec(int r)
{
    if (watching) {
        int e = errno;
        record("F %d\n", (int)getpid());
        errno = e;
    }
    return r;
}

int execve(const char *path, char *const argv[], char *const envp[])
{
    REAL(int, execve, const char *, char *const[], char *const[]);
    before_exec();
    return after_exec(real_execve(path, argv, envp));
}

int execv(const char *path, char *const argv[])
{
    REAL(int, execv, const char *, char *const[]);
    before_exec();
    return after_exec(real_execv(path, argv));
}

int execvp(const char *file, char *const argv[])
{
    REAL(int, execvp, const char *, char *const[]);
    before_exec();
    return after_exec(real_execvp(file, argv));
}

int execvpe(const char *file, char *const argv[], char *const envp[])
{
    REAL(int, execvpe, const char *, char *const[], char *const[]);
    before_exec();
    return after_exec(real_execvpe(file, argv, envp));
}

int fexecve(int fd, char *const argv[], char *const envp[])
{
    REAL(int, fexecve, int, char *const[], char *const[]);
    before_exec();
    return after_exec(real_fexecve(fd, argv, envp));
}

int execveat(int dir, const char *path, char *const argv[], char *const envp[], int fl)
{
    REAL(int, execveat, int, const char *, char *const[], char *const[], int);
    before_exec();
    return after_exec(real_execveat(dir, path, argv, envp, fl));
}

/* The execl family gathers its arguments into the execv family's. */
#define GATHER(first) \
    va_list ap; size_t n = 1; \
    va_start(ap, first); while (va_arg(ap, char *)) n++; va_end(ap); \
    char **argv = alloca((n + 1) * sizeof *argv); argv[0] = (char *)(first); \
    va_start(ap, first); for (size_t k = 1; k <= n; k++) argv[k] = va_arg(ap, char *);

int execl(const char *path, const char *arg, ...)
{
    GATHER(arg);
    va_end(ap);
    return execv(path, argv);
}

int execlp(const char *file, const char *arg, ...)
{
    GATHER(arg);
    va_end(ap);
    return execvp(file, argv);
}

int execle(const char *path, const char *arg, ...)
{
    GATHER(arg);
    char **envp = va_arg(ap, char **);
    va_end(ap);
    return execve(path, argv, envp);
}

static int spawned(int r, pid_t *pid)
{
    if (watching && r == 0 && pid) record("S %d\n", (int)*pid);
    else if (watching && r == 0) record("U a child spawned without its pid\n");
    return r;
}

int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                const posix_spawnattr_t *at, char *const argv[], char *const envp[])
{
    REAL(int, posix_spawn, pid_t *, const char *, const posix_spawn_file_actions_t *,
         const posix_spawnattr_t *, char *const[], char *const[]);
    flush();
    return spawned(real_posix_spawn(pid, path, fa, at, argv, envp), pid);
}

int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *at, char *const argv[], char *const envp[])
{
    REAL(int, posix_spawnp, pid_t *, const char *, const posix_spawn_file_actions_t *,
         const posix_spawnattr_t *, char *const[], char *const[]);
    flush();
    return spawned(real_posix_spawnp(pid, file, fa, at, argv, envp), pid);
}

/* system and popen start /bin/sh through libc's own spawn, whose child the shim never sees. */
int system(const char *cmd)
{
    REAL(int, system, const char *);
    if (watching) record("U a child started by system()\n");
    flush();
    return real_system(cmd);
}

FILE *popen(const char *cmd, const char *how)
{
    REAL(FILE *, popen, const char *, const char *);
    if (watching) record("U a child started by popen()\n");
    flush();
    return real_popen(cmd, how);
}

pid_t fork(void)
{
    REAL(pid_t, fork, void);
    flush();  /* the child would write the parent's records a second time */
    pid_t pid = real_fork();
    if (watching && pid > 0) record("S %d\n", (int)pid);
    return pid;
}

void _exit(int status)
{
    static void (*real__exit)(int);
    if (!real__exit) real__exit = (void (*)(int))dlsym(RTLD_NEXT, "_exit");
    if (watching) at_exit();
    real__exit(status);
    __builtin_unreachable();
}

void _Exit(int status) { _exit(status); }
