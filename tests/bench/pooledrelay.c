/* The pooled floor: Sluice's set-up path with nothing but the card's shape, a measuring stick for
 * `make bench`'s scenario 4 and not a product. SOCKS5 with RFC 1929 user/pass (from argv), CONNECT
 * to IPv4 loopback only. Up to five threads wait in accept(2) and each serves what it accepts:
 * the handshake, then client->destination; destination->client goes to a parked thread (a new
 * one when none is parked), as in Sluice. Blocking sockets, read/write through a stack buffer, one thread per direction;
 * no limiter, accounts, timeouts, logs or checks past the protocol's. Built by the benchmark with
 * `cc -O2 -pthread`.  Usage: pooledrelay PORT USER PASS */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPTORS 5

static const char *user, *pass;
static int lsn;
static pthread_attr_t attr;

/* One tunnel's two sockets, closed when both directions are done. */
struct tunnel { int c, o; atomic_int refs; };

static void release(struct tunnel *t) {
    if (atomic_fetch_sub(&t->refs, 1) == 1) { close(t->c); close(t->o); free(t); }
}

static int rd(int fd, void *b, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, (char *)b + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static void pump(int from, int to) {
    char b[16384];
    for (;;) {
        ssize_t n = read(from, b, sizeof b);
        if (n <= 0) break;
        for (ssize_t w = 0; w < n;) {
            ssize_t k = write(to, b + w, (size_t)(n - w));
            if (k <= 0) { shutdown(from, SHUT_RDWR); goto done; }
            w += k;
        }
    }
done:
    shutdown(to, SHUT_WR);
}

/* The thread pool: a parked thread takes the next job; with none free, a new thread does. */
struct job { void (*run)(void *); void *arg; struct job *next; };
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static struct job *queue, **tail = &queue;
static int parked, queued;

static void *worker(void *arg) {
    struct job *j = arg;
    for (;;) {
        j->run(j->arg);
        free(j);
        pthread_mutex_lock(&mu);
        parked++;
        while (!queue) pthread_cond_wait(&cv, &mu);
        parked--;
        queued--;
        j = queue;
        queue = j->next;
        if (!queue) tail = &queue;
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

static int start(void (*run)(void *), void *arg) {
    struct job *j = malloc(sizeof *j);
    if (!j) return -1;
    *j = (struct job){run, arg, NULL};
    pthread_mutex_lock(&mu);
    if (parked > queued) {
        queued++;
        *tail = j;
        tail = &j->next;
        pthread_cond_signal(&cv);
        pthread_mutex_unlock(&mu);
        return 0;
    }
    pthread_mutex_unlock(&mu);
    pthread_t th;
    if (pthread_create(&th, &attr, worker, j)) {
        free(j);
        return -1;
    }
    return 0;
}

static void down(void *arg) {
    struct tunnel *t = arg;
    pump(t->o, t->c);
    release(t);
}

static void serve(int c) {
    unsigned char b[512];
    int o = -1;
    if (rd(c, b, 2) || b[0] != 5 || rd(c, b + 2, b[1]) || !memchr(b + 2, 2, b[1])) goto out;
    if (write(c, "\x05\x02", 2) != 2) goto out;
    if (rd(c, b, 2) || b[0] != 1 || rd(c, b + 2, b[1]) || rd(c, b + 2 + b[1], 1)) goto out;
    size_t ul = b[1], pl = b[2 + ul];
    if (rd(c, b + 3 + ul, pl)) goto out;
    int ok = ul == strlen(user) && pl == strlen(pass) && !memcmp(b + 2, user, ul) &&
             !memcmp(b + 3 + ul, pass, pl);
    if (write(c, ok ? "\x01\x00" : "\x01\x01", 2) != 2 || !ok) goto out;
    if (rd(c, b, 4) || b[0] != 5 || b[1] != 1 || b[3] != 1) goto out;
    struct sockaddr_in a = {.sin_family = AF_INET};
    if (rd(c, &a.sin_addr, 4) || rd(c, &a.sin_port, 2)) goto out;
    if ((ntohl(a.sin_addr.s_addr) >> 24) != 127) goto out;
    o = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (o < 0 || connect(o, (struct sockaddr *)&a, sizeof a)) {
        (void)!write(c, "\x05\x05\x00\x01\0\0\0\0\0\0", 10);
        goto out;
    }
    int one = 1;
    setsockopt(o, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (write(c, "\x05\x00\x00\x01\0\0\0\0\0\0", 10) != 10) goto out;
    struct tunnel *t = malloc(sizeof *t);
    if (!t) goto out;
    t->c = c;
    t->o = o;
    atomic_init(&t->refs, 2);
    if (start(down, t)) {
        free(t);
        goto out;
    }
    pump(c, o);
    release(t);
    return;
out:
    if (o >= 0) close(o);
    close(c);
}

/* Threads waiting in accept: the one that takes the last place starts another before it serves;
 * one that finishes a connection goes back to accept while fewer than ACCEPTORS wait. */
static atomic_int waiting;

static void accepting(void *arg) {
    (void)arg;
    for (;;) {
        int c = accept4(lsn, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        if (atomic_fetch_sub(&waiting, 1) == 1) {
            atomic_fetch_add(&waiting, 1);
            if (start(accepting, NULL)) atomic_fetch_sub(&waiting, 1);
        }
        serve(c);
        if (atomic_load(&waiting) >= ACCEPTORS) return;
        atomic_fetch_add(&waiting, 1);
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: pooledrelay PORT USER PASS\n");
        return 2;
    }
    user = argv[2];
    pass = argv[3];
    signal(SIGPIPE, SIG_IGN);
    int one = 1;
    lsn = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setsockopt(lsn, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (lsn < 0 || bind(lsn, (struct sockaddr *)&a, sizeof a) || listen(lsn, 1024)) {
        perror("listen");
        return 1;
    }
    /* Accepted sockets inherit TCP_NODELAY, as Sluice's do (`os::tune_listener`). */
    setsockopt(lsn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    atomic_store(&waiting, ACCEPTORS);
    for (int i = 1; i < ACCEPTORS; i++) {
        if (start(accepting, NULL)) {
            perror("pthread_create");
            return 1;
        }
    }
    /* The main thread is one of the pool's, so it parks rather than return. */
    struct job *j = malloc(sizeof *j);
    if (!j) return 1;
    *j = (struct job){accepting, NULL, NULL};
    worker(j);
}
