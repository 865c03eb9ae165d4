/*
 * felixpy-cni: the CNI plugin kubelet runs for every pod, as a static C executable.
 *
 * It speaks exactly the protocol of felixpy/cni/plugin.py, for nodes whose image has no Python:
 * VERSION is answered here; ADD, DEL, CHECK, STATUS and GC are sent to the agent's unix socket
 * (the network configuration's `agent_socket`, default /var/run/calico/felixpy-cni.sock) as
 *     {"env": {<every CNI_* variable>}, "config": <the stdin JSON object>}
 * the write side is shut down, and the agent's reply {"result": ...} or {"error": {code, msg,
 * details}} is printed as the CNI result (exit 0) or a CNI error object (exit 1). DEL, STATUS and
 * GC print nothing on success.
 *
 * The agent answers every connection at once with one space (ACCEPTED), then with its reply:
 * connecting, sending and that first byte must take at most ACCEPT_TIMEOUT seconds, the rest of the
 * reply at most REPLY_TIMEOUT. When the agent cannot be reached, STATUS answers 50 (not available),
 * ADD, CHECK and GC answer 11, and DEL still succeeds: the pod's veth is removed from inside its
 * network namespace (setns + netlink, only a veth named CNI_IFNAME) and the request is left in
 * <agent_socket>.pending/ for the agent to finish (release the addresses, delete the endpoint).
 * plugin.py's docstring says why.
 *
 * POSIX, Linux and libc only, so `gcc -O2 -static` gives one file that runs on any Linux node. The
 * stdin JSON is validated by a small scanner (strict JSON plus Python's NaN/Infinity, as json.loads
 * accepts them) and forwarded verbatim, so the agent sees the very object plugin.py would send.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_link.h>
#include <net/if.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

/* The protocol constants are plugin.py's, repeated here: tests/unit/test_cni_constants.py checks
 * that every one of them equals its namesake there. */
#define DEFAULT_SOCKET "/var/run/calico/felixpy-cni.sock"
#define DEFAULT_VERSION "1.0.0" /* the answer's cniVersion when stdin has no readable one */
#ifndef ACCEPT_TIMEOUT /* tests build the shim with shorter ones (-D) */
#define ACCEPT_TIMEOUT 3 /* seconds to connect, send and get the agent's ACCEPTED byte */
#endif
#ifndef REPLY_TIMEOUT
#define REPLY_TIMEOUT 30 /* seconds for the rest of the reply */
#endif
#define ACCEPTED " " /* the agent's first byte on every connection */
#define PENDING_SUFFIX ".pending" /* <agent_socket>.pending/: DELs the agent has to finish */
#define HINT " (is felixpy-node running on this node?)"
#define MAX_INPUT ((size_t)64 << 20) /* stdin and the reply; a network config is a few KiB */
#define MAX_DEPTH 512 /* nesting limit of the JSON scanner, so recursion stays bounded */

/* CNI spec error codes, as in plugin.py */
#define INCOMPATIBLE_VERSION 1
#define INVALID_ENV 4
#define IO_FAILURE 5
#define DECODE_FAILURE 6
#define INVALID_CONFIG 7
#define TRY_AGAIN_LATER 11
#define NOT_AVAILABLE 50

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

extern char **environ;

static const char *const SUPPORTED[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define N_SUPPORTED (sizeof SUPPORTED / sizeof SUPPORTED[0])

/* ---------------------------------------------------------------- growable byte buffer */

struct buf {
    char *data;
    size_t len, cap;
};

static void out_of_memory(void)
{
    static const char msg[] =
        "{\"cniVersion\": \"" DEFAULT_VERSION "\", \"code\": " STRINGIFY(IO_FAILURE)
        ", \"msg\": \"felixpy-cni: out of memory\", \"details\": \"\"}\n";
    if (write(STDOUT_FILENO, msg, sizeof msg - 1) < 0) {
        /* nothing left to report to */
    }
    _exit(1);
}

static void buf_reserve(struct buf *b, size_t extra)
{
    if (extra <= b->cap - b->len)
        return;
    if (extra > ((size_t)-1) / 2 - b->len)
        out_of_memory();
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra)
        cap *= 2;
    char *data = realloc(b->data, cap);
    if (!data)
        out_of_memory();
    b->data = data;
    b->cap = cap;
}

/* Appends, and keeps a NUL after the data so that b->data is always a C string too. */
static void buf_add(struct buf *b, const char *s, size_t n)
{
    buf_reserve(b, n + 1);
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void buf_adds(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

/* ---------------------------------------------------------------- JSON scanning */

struct span {
    const char *p;
    size_t n;
};

struct scan {
    const char *p, *end;
};

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static void skip_ws(struct scan *s)
{
    while (s->p < s->end && is_ws(*s->p))
        s->p++;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Length of the well-formed UTF-8 sequence at p (no overlongs, no surrogates), or 0. */
static size_t utf8_len(const unsigned char *p, const unsigned char *end)
{
    unsigned c = p[0];
    size_t n;
    unsigned cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if ((size_t)(end - p) < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)))
        return 0;
    return n;
}

/* A string token starting at s->p (which is '"'); advances past the closing quote. */
static int scan_string(struct scan *s)
{
    s->p++;
    while (s->p < s->end) {
        unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            s->p++;
            return 1;
        }
        if (c < 0x20) /* json.loads is strict: raw control characters are not allowed */
            return 0;
        if (c == '\\') {
            if (s->end - s->p < 2)
                return 0;
            char e = s->p[1];
            if (e == 'u') {
                if (s->end - s->p < 6)
                    return 0;
                for (int i = 2; i < 6; i++)
                    if (hexval(s->p[i]) < 0)
                        return 0;
                s->p += 6;
            } else if (strchr("\"\\/bfnrt", e) && e != '\0') {
                s->p += 2;
            } else {
                return 0;
            }
        } else {
            size_t n = utf8_len((const unsigned char *)s->p, (const unsigned char *)s->end);
            if (n == 0)
                return 0;
            s->p += n;
        }
    }
    return 0;
}

static int scan_literal(struct scan *s, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0)
        return 0;
    s->p += n;
    return 1;
}

static int scan_digits(struct scan *s)
{
    const char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9')
        s->p++;
    return s->p > start;
}

static int scan_number(struct scan *s)
{
    if (s->p < s->end && *s->p == '-') {
        s->p++;
        if (s->p < s->end && *s->p == 'I') /* -Infinity, accepted by json.loads */
            return scan_literal(s, "Infinity");
    }
    if (s->p >= s->end)
        return 0;
    if (*s->p == '0')
        s->p++;
    else if (!scan_digits(s))
        return 0;
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!scan_digits(s))
            return 0;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (!scan_digits(s))
            return 0;
    }
    return 1;
}

static int scan_value(struct scan *s, int depth);

static int scan_container(struct scan *s, int depth, char close, int is_object)
{
    if (depth >= MAX_DEPTH)
        return 0;
    s->p++;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        return 1;
    }
    for (;;) {
        if (is_object) {
            if (s->p >= s->end || *s->p != '"' || !scan_string(s))
                return 0;
            skip_ws(s);
            if (s->p >= s->end || *s->p != ':')
                return 0;
            s->p++;
            skip_ws(s);
        }
        if (!scan_value(s, depth + 1))
            return 0;
        skip_ws(s);
        if (s->p >= s->end)
            return 0;
        if (*s->p == close) {
            s->p++;
            return 1;
        }
        if (*s->p != ',')
            return 0;
        s->p++;
        skip_ws(s);
    }
}

/* One JSON value at s->p (no leading whitespace); advances past it. */
static int scan_value(struct scan *s, int depth)
{
    if (s->p >= s->end)
        return 0;
    switch (*s->p) {
    case '{':
        return scan_container(s, depth, '}', 1);
    case '[':
        return scan_container(s, depth, ']', 0);
    case '"':
        return scan_string(s);
    case 't':
        return scan_literal(s, "true");
    case 'f':
        return scan_literal(s, "false");
    case 'n':
        return scan_literal(s, "null");
    case 'N':
        return scan_literal(s, "NaN");
    case 'I':
        return scan_literal(s, "Infinity");
    default:
        return scan_number(s);
    }
}

/* The whole of text is exactly one JSON value (whitespace around it allowed). */
static int json_valid(struct span text, size_t *error_at)
{
    struct scan s = {text.p, text.p + text.n};
    skip_ws(&s);
    int ok = scan_value(&s, 0);
    if (ok) {
        skip_ws(&s);
        ok = s.p == s.end;
    }
    *error_at = (size_t)(s.p - text.p);
    return ok;
}

static void put_utf8(struct buf *b, unsigned cp)
{
    char out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xe0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        n = 3;
    } else {
        out[0] = (char)(0xf0 | (cp >> 18));
        out[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        out[3] = (char)(0x80 | (cp & 0x3f));
        n = 4;
    }
    buf_add(b, out, n);
}

static unsigned hex4(const char *p)
{
    return (unsigned)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

/* Decode a validated string token (quotes included) into b as UTF-8; returns its length. */
static size_t decode_string(struct span tok, struct buf *b)
{
    const char *p = tok.p + 1, *end = tok.p + tok.n - 1;
    b->len = 0;
    while (p < end) {
        if (*p != '\\') {
            buf_add(b, p, 1);
            p++;
            continue;
        }
        char e = p[1];
        if (e == 'u') {
            unsigned cp = hex4(p + 2);
            p += 6;
            if (cp >= 0xd800 && cp <= 0xdbff && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                unsigned lo = hex4(p + 2);
                if (lo >= 0xdc00 && lo <= 0xdfff) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    p += 6;
                }
            }
            put_utf8(b, cp); /* a lone surrogate becomes its 3-byte form; it names no real socket */
            continue;
        }
        static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
        const char *at = strchr(from, e);
        buf_add(b, &to[at - from], 1);
        p += 2;
    }
    buf_add(b, "", 0); /* the NUL, even for "" */
    return b->len;
}

/*
 * The value of `key` in the validated JSON object obj (json.loads keeps the last of duplicate
 * keys, so this does too). Returns 1 and sets *out when found.
 */
static int object_get(struct span obj, const char *key, struct span *out)
{
    struct scan s = {obj.p, obj.p + obj.n};
    struct buf name = {0};
    size_t keylen = strlen(key);
    int found = 0;
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{')
        return 0;
    s.p++;
    skip_ws(&s);
    while (s.p < s.end && *s.p == '"') {
        struct span k = {s.p, 0};
        if (!scan_string(&s))
            break;
        k.n = (size_t)(s.p - k.p);
        skip_ws(&s);
        s.p++; /* ':' */
        skip_ws(&s);
        struct span v = {s.p, 0};
        if (!scan_value(&s, 1))
            break;
        v.n = (size_t)(s.p - v.p);
        if (decode_string(k, &name) == keylen && memcmp(name.data, key, keylen) == 0) {
            *out = v;
            found = 1;
        }
        skip_ws(&s);
        if (s.p < s.end && *s.p == ',') {
            s.p++;
            skip_ws(&s);
        }
    }
    free(name.data);
    return found;
}

/* Python truthiness of a validated JSON value: null, false, 0, "", [] and {} are false. */
static int json_falsy(struct span v)
{
    if (v.n == 0)
        return 1;
    char c = v.p[0];
    if (c == 'n' || c == 'f')
        return 1;
    if (c == '"')
        return v.n == 2;
    if (c == '[' || c == '{') {
        struct scan s = {v.p + 1, v.p + v.n};
        skip_ws(&s);
        return s.p < s.end && (*s.p == ']' || *s.p == '}');
    }
    if (c == '-' || (c >= '0' && c <= '9')) { /* zero when every digit of the mantissa is 0 */
        for (size_t i = 0; i < v.n && v.p[i] != 'e' && v.p[i] != 'E'; i++)
            if (v.p[i] >= '1' && v.p[i] <= '9')
                return 0;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- JSON output */

/* A JSON string of the bytes s[0..n) as json.dumps writes it (ASCII only); bytes that are not
 * UTF-8 become \udcXX, which is how Python's os.environ presents them. */
static void put_json_string(struct buf *b, const char *s, size_t n)
{
    char esc[16];
    const unsigned char *p = (const unsigned char *)s, *end = p + n;
    buf_add(b, "\"", 1);
    while (p < end) {
        unsigned c = *p;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            buf_add(b, esc, 2);
            p++;
        } else if (c >= 0x20 && c < 0x80) {
            buf_add(b, (const char *)p, 1);
            p++;
        } else if (c < 0x20) {
            const char *short_form = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
                                   : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            if (short_form) {
                buf_adds(b, short_form);
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                buf_adds(b, esc);
            }
            p++;
        } else {
            size_t len = utf8_len(p, end);
            if (len == 0) {
                snprintf(esc, sizeof esc, "\\udc%02x", c);
                buf_adds(b, esc);
                p++;
                continue;
            }
            unsigned cp = c & (len == 2 ? 0x1f : len == 3 ? 0x0f : 0x07);
            for (size_t i = 1; i < len; i++)
                cp = (cp << 6) | (p[i] & 0x3f);
            if (cp >= 0x10000) {
                cp -= 0x10000;
                snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", cp);
            }
            buf_adds(b, esc);
            p += len;
        }
    }
    buf_add(b, "\"", 1);
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* stdout is gone: nobody is left to tell */
        p += w;
        n -= (size_t)w;
    }
}

/* Print the CNI error object {cniVersion, code, msg, details} from raw JSON tokens; returns 1. */
static int emit_error_raw(struct span version, struct span code, struct span msg, struct span details)
{
    struct buf out = {0};
    buf_adds(&out, "{\"cniVersion\": ");
    buf_add(&out, version.p, version.n);
    buf_adds(&out, ", \"code\": ");
    buf_add(&out, code.p, code.n);
    buf_adds(&out, ", \"msg\": ");
    buf_add(&out, msg.p, msg.n);
    buf_adds(&out, ", \"details\": ");
    buf_add(&out, details.p, details.n);
    buf_adds(&out, "}\n");
    write_all(STDOUT_FILENO, out.data, out.len);
    free(out.data);
    return 1;
}

static int emit_error(struct span version, int code, const char *msg, const char *details, size_t details_len)
{
    char code_text[16];
    struct buf m = {0}, d = {0};
    snprintf(code_text, sizeof code_text, "%d", code);
    put_json_string(&m, msg, strlen(msg));
    put_json_string(&d, details, details_len);
    struct span c = {code_text, strlen(code_text)}, ms = {m.data, m.len}, ds = {d.data, d.len};
    emit_error_raw(version, c, ms, ds);
    free(m.data);
    free(d.data);
    return 1;
}

/* ---------------------------------------------------------------- I/O */

/* Read all of fd into b (at most MAX_INPUT bytes). Returns 0, or an errno value. */
static int read_all(int fd, struct buf *b)
{
    for (;;) {
        if (b->len >= MAX_INPUT)
            return EFBIG;
        buf_reserve(b, 65536);
        ssize_t r = read(fd, b->data + b->len, b->cap - b->len);
        if (r == 0)
            return 0;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        b->len += (size_t)r;
    }
}

static void errno_text(struct buf *b, int err)
{
    char text[64];
    if (err == EAGAIN || err == EWOULDBLOCK) { /* SO_SNDTIMEO / SO_RCVTIMEO expired */
        buf_adds(b, "timed out");
        return;
    }
    snprintf(text, sizeof text, "[Errno %d] ", err);
    buf_adds(b, text);
    buf_adds(b, strerror(err));
}

static void set_timeouts(int fd, int seconds)
{
    struct timeval tv = {seconds, 0};
    /* Linux applies SO_SNDTIMEO to a blocking AF_UNIX connect as well as to send. */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/*
 * Send request to the unix socket at path and read the whole reply. Returns 0, or -1 with why
 * set to plugin.py's Unreachable text ("<path>: <reason>[ (hint)]").
 */
static int ask_agent(const char *path, size_t path_len, const struct buf *request, struct buf *reply, struct buf *why)
{
    struct sockaddr_un addr;
    int fd = -1, err = 0, accepting = 1;
    buf_add(why, path, path_len);
    buf_adds(why, ": ");
    if (memchr(path, '\0', path_len)) {
        buf_adds(why, "embedded null byte" HINT);
        return -1;
    }
    if (path_len > sizeof addr.sun_path) {
        buf_adds(why, "AF_UNIX path too long" HINT);
        return -1;
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail;
    set_timeouts(fd, ACCEPT_TIMEOUT);
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, path, path_len);
    while (connect(fd, (struct sockaddr *)&addr, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len)) < 0)
        if (errno != EINTR)
            goto fail;
    for (size_t sent = 0; sent < request->len;) {
        ssize_t w = send(fd, request->data + sent, request->len - sent, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            goto fail;
        }
        sent += (size_t)w;
    }
    if (shutdown(fd, SHUT_WR) < 0)
        goto fail;
    for (;;) { /* the first byte: the agent is there */
        buf_reserve(reply, 65536);
        ssize_t r = read(fd, reply->data + reply->len, reply->cap - reply->len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            goto fail;
        reply->len += (size_t)r;
        break;
    }
    accepting = 0;
    if (reply->len > 0) {
        set_timeouts(fd, REPLY_TIMEOUT);
        err = read_all(fd, reply);
        if (err) {
            errno = err;
            goto fail;
        }
    }
    close(fd);
    return 0;
fail:
    err = errno;
    if (fd >= 0)
        close(fd);
    if (err == EAGAIN || err == EWOULDBLOCK) { /* SO_SNDTIMEO / SO_RCVTIMEO expired */
        char text[96];
        if (accepting)
            snprintf(text, sizeof text, "the agent did not accept the request within %d s" HINT, ACCEPT_TIMEOUT);
        else
            snprintf(text, sizeof text, "the agent did not answer within %d s", REPLY_TIMEOUT);
        buf_adds(why, text);
        return -1;
    }
    errno_text(why, err);
    buf_adds(why, HINT);
    return -1;
}

/* ---------------------------------------------------------------- DEL without the agent */

/* "<what>: [Errno N] <strerror>", plugin.py's _errno_text. */
static void failed_text(struct buf *b, const char *what, int err)
{
    char text[64];
    buf_adds(b, what);
    snprintf(text, sizeof text, ": [Errno %d] ", err);
    buf_adds(b, text);
    buf_adds(b, strerror(err));
}

/*
 * One netlink request on fd. GETLINK goes without NLM_F_ACK (the kernel answers with the link or
 * an error), DELLINK with it. Returns 0 with the answer in ans (a GETLINK's RTM_NEWLINK), or an
 * errno value (ENODEV: no such interface).
 */
static int nl_call(int fd, unsigned short type, unsigned seq, const void *body, size_t len, char *ans, size_t cap,
                   size_t *ans_len)
{
    char req[256];
    struct nlmsghdr hdr = {0};
    if (NLMSG_HDRLEN + len > sizeof req)
        return EINVAL;
    hdr.nlmsg_len = (unsigned)(NLMSG_HDRLEN + len);
    hdr.nlmsg_type = type;
    hdr.nlmsg_flags = (unsigned short)(NLM_F_REQUEST | (type == RTM_GETLINK ? 0 : NLM_F_ACK));
    hdr.nlmsg_seq = seq;
    memcpy(req, &hdr, sizeof hdr);
    memcpy(req + NLMSG_HDRLEN, body, len);
    if (send(fd, req, hdr.nlmsg_len, 0) < 0)
        return errno;
    for (;;) {
        ssize_t n = recv(fd, ans, cap, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        for (size_t off = 0; off + NLMSG_HDRLEN <= (size_t)n;) {
            struct nlmsghdr m;
            memcpy(&m, ans + off, sizeof m);
            if (m.nlmsg_len < NLMSG_HDRLEN || off + m.nlmsg_len > (size_t)n)
                return EBADMSG;
            if (m.nlmsg_seq == seq) {
                if (m.nlmsg_type == NLMSG_ERROR) {
                    int code;
                    memcpy(&code, ans + off + NLMSG_HDRLEN, sizeof code);
                    return -code;
                }
                memmove(ans, ans + off, m.nlmsg_len);
                *ans_len = m.nlmsg_len;
                return 0;
            }
            off += NLMSG_ALIGN(m.nlmsg_len);
        }
    }
}

static void put_attr(char *at, unsigned short type, const void *data, size_t len)
{
    struct rtattr a = {(unsigned short)RTA_LENGTH(len), type};
    memcpy(at, &a, sizeof a);
    memcpy(at + RTA_LENGTH(0), data, len);
}

/* Whether the link message (an RTM_NEWLINK) has IFLA_LINKINFO / IFLA_INFO_KIND "veth". */
static int link_is_veth(const char *msg, size_t len)
{
    for (size_t off = NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct ifinfomsg)); off + RTA_LENGTH(0) <= len;) {
        struct rtattr a;
        memcpy(&a, msg + off, sizeof a);
        if (a.rta_len < RTA_LENGTH(0) || off + a.rta_len > len)
            return 0;
        if ((a.rta_type & NLA_TYPE_MASK) == IFLA_LINKINFO) {
            for (size_t in = off + RTA_LENGTH(0); in + RTA_LENGTH(0) <= off + a.rta_len;) {
                struct rtattr b;
                memcpy(&b, msg + in, sizeof b);
                if (b.rta_len < RTA_LENGTH(0) || in + b.rta_len > off + a.rta_len)
                    return 0;
                if ((b.rta_type & NLA_TYPE_MASK) == IFLA_INFO_KIND)
                    return b.rta_len - RTA_LENGTH(0) >= 4 && memcmp(msg + in + RTA_LENGTH(0), "veth", 4) == 0 &&
                           (b.rta_len - RTA_LENGTH(0) == 4 || msg[in + RTA_LENGTH(0) + 4] == '\0');
                in += RTA_ALIGN(b.rta_len);
            }
            return 0;
        }
        off += RTA_ALIGN(a.rta_len);
    }
    return 0;
}

/* Delete the veth called ifname inside the netns at path (nothing if absent or not a veth).
 * Returns 0, or fills details and returns 1. */
static int remove_pod_veth(const char *netns, const char *ifname, struct buf *details)
{
    static char ans[16384];
    size_t ans_len = 0, name_len = strlen(ifname) + 1;
    char body[128] = {0};
    struct ifinfomsg ifi = {0};
    int ns = open(netns, O_RDONLY | O_CLOEXEC);
    if (ns < 0) {
        failed_text(details, netns, errno);
        return 1;
    }
    if (setns(ns, CLONE_NEWNET) < 0) {
        int err = errno;
        close(ns);
        buf_adds(details, "setns ");
        failed_text(details, netns, err);
        return 1;
    }
    close(ns);
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) {
        failed_text(details, "netlink socket", errno);
        return 1;
    }
    if (name_len > IFNAMSIZ) {
        close(fd);
        return 0; /* no interface can have that name */
    }
    ifi.ifi_family = AF_UNSPEC;
    memcpy(body, &ifi, sizeof ifi);
    put_attr(body + NLMSG_ALIGN(sizeof ifi), IFLA_IFNAME, ifname, name_len);
    int err = nl_call(fd, RTM_GETLINK, 1, body, NLMSG_ALIGN(sizeof ifi) + RTA_SPACE(name_len), ans, sizeof ans, &ans_len);
    if (err == 0 && ans_len >= NLMSG_HDRLEN + sizeof ifi) {
        struct ifinfomsg found;
        memcpy(&found, ans + NLMSG_HDRLEN, sizeof found);
        if (!link_is_veth(ans, ans_len)) {
            close(fd);
            return 0; /* not ours to remove */
        }
        ifi.ifi_index = found.ifi_index;
        err = nl_call(fd, RTM_DELLINK, 2, &ifi, sizeof ifi, ans, sizeof ans, &ans_len);
        if (err) {
            close(fd);
            if (err == ENODEV)
                return 0;
            failed_text(details, "netlink link delete", err);
            return 1;
        }
    } else if (err && err != ENODEV) {
        close(fd);
        failed_text(details, "netlink link get", err);
        return 1;
    }
    close(fd);
    return 0;
}

/* <containerID>.<ifname>.json, every byte outside [A-Za-z0-9_-] as %XX (plugin.py's _spool_name). */
static void spool_name(struct buf *b, const char *cid, const char *ifname)
{
    const char *parts[2] = {cid, ifname};
    char esc[4];
    for (int i = 0; i < 2; i++) {
        for (const unsigned char *p = (const unsigned char *)parts[i]; *p; p++) {
            if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_' ||
                *p == '-') {
                buf_add(b, (const char *)p, 1);
            } else {
                snprintf(esc, sizeof esc, "%%%02X", *p);
                buf_adds(b, esc);
            }
        }
        buf_adds(b, i == 0 ? "." : ".json");
    }
}

/* Write the request into <path>.pending/. Returns 1 written, 0 no directory (no agent ever ran
 * here), -1 with details filled. */
static int leave_for_agent(const char *path, const struct buf *request, struct buf *details)
{
    struct buf dir = {0}, name = {0}, final = {0}, temp = {0};
    struct stat st;
    const char *cid = getenv("CNI_CONTAINERID"), *ifname = getenv("CNI_IFNAME");
    int rc = 1;
    buf_adds(&dir, path);
    buf_adds(&dir, PENDING_SUFFIX);
    if (stat(dir.data, &st) < 0 || !S_ISDIR(st.st_mode)) {
        rc = 0;
        goto out;
    }
    spool_name(&name, cid ? cid : "", ifname ? ifname : "");
    if (name.len > 200) {
        failed_text(details, "pending file name for CNI_CONTAINERID", ENAMETOOLONG);
        rc = -1;
        goto out;
    }
    buf_adds(&final, dir.data);
    buf_adds(&final, "/");
    buf_adds(&final, name.data);
    buf_adds(&temp, dir.data);
    buf_adds(&temp, "/.");
    buf_adds(&temp, name.data);
    buf_adds(&temp, ".tmp");
    int fd = open(temp.data, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int err = fd < 0 ? errno : 0;
    for (size_t done = 0; !err && done < request->len;) {
        ssize_t w = write(fd, request->data + done, request->len - done);
        if (w < 0 && errno != EINTR)
            err = errno;
        else if (w > 0)
            done += (size_t)w;
    }
    if (!err && fsync(fd) < 0)
        err = errno;
    if (fd >= 0 && close(fd) < 0 && !err)
        err = errno;
    if (!err && rename(temp.data, final.data) < 0) /* the agent never sees half a file */
        err = errno;
    if (err) {
        unlink(temp.data);
        failed_text(details, dir.data, err);
        rc = -1;
    }
out:
    free(dir.data);
    free(name.data);
    free(final.data);
    free(temp.data);
    return rc;
}

/* DEL when the agent is unreachable: see the top of this file. Returns the exit code. */
static int delete_without_agent(struct span version, const char *path, const struct buf *request, const struct buf *why)
{
    const char *netns = getenv("CNI_NETNS"), *ifname = getenv("CNI_IFNAME");
    struct buf details = {0};
    struct stat st;
    if (netns && *netns && ifname && *ifname && stat(netns, &st) == 0 &&
        remove_pod_veth(netns, ifname, &details))
        return emit_error(version, IO_FAILURE, "failed to remove the pod's network interface without the agent",
                          details.data, details.len);
    int spooled = leave_for_agent(path, request, &details);
    if (spooled < 0)
        return emit_error(version, IO_FAILURE, "failed to record the DEL for the felixpy agent", details.data,
                          details.len);
    fprintf(stderr, "felixpy-cni: agent unreachable (%s); pod veth removed, %s\n", why->data,
            spooled ? "address release left to the agent" : "no agent ever ran here");
    return 0;
}

/* ---------------------------------------------------------------- the plugin */

static int command_is(const char *command, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(command, names[i]) == 0)
            return 1;
    return 0;
}

/* Python's repr() of an ASCII-ish string, for the INVALID_ENV details "CNI_COMMAND=%r". */
static void put_repr(struct buf *b, const char *s)
{
    char quote = (strchr(s, '\'') && !strchr(s, '"')) ? '"' : '\'';
    char esc[8];
    buf_add(b, &quote, 1);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '\\' || *p == (unsigned char)quote) {
            esc[0] = '\\';
            esc[1] = (char)*p;
            buf_add(b, esc, 2);
        } else if (*p == '\n') {
            buf_adds(b, "\\n");
        } else if (*p == '\r') {
            buf_adds(b, "\\r");
        } else if (*p == '\t') {
            buf_adds(b, "\\t");
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", *p);
            buf_adds(b, esc);
        } else {
            buf_add(b, (const char *)p, 1);
        }
    }
    buf_add(b, &quote, 1);
}

/* {"env": {CNI_* variables, first occurrence of each name}, "config": <stdin JSON>} */
static void build_request(struct buf *req, struct span config)
{
    int first = 1;
    buf_adds(req, "{\"env\": {");
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (strncmp(*e, "CNI_", 4) != 0 || !eq)
            continue;
        size_t name_len = (size_t)(eq - *e);
        int seen = 0;
        for (char **prev = environ; prev < e && !seen; prev++)
            seen = strncmp(*prev, *e, name_len + 1) == 0;
        if (seen)
            continue;
        if (!first)
            buf_adds(req, ", ");
        first = 0;
        put_json_string(req, *e, name_len);
        buf_adds(req, ": ");
        put_json_string(req, eq + 1, strlen(eq + 1));
    }
    buf_adds(req, "}, \"config\": ");
    buf_add(req, config.p, config.n);
    buf_adds(req, "}");
}

int main(void)
{
    static const char *const commands[] = {"ADD", "DEL", "CHECK", "STATUS", "GC"};
    static const char *const quiet[] = {"DEL", "STATUS", "GC"};
    const char *command = getenv("CNI_COMMAND");
    struct span version = {"\"" DEFAULT_VERSION "\"", sizeof DEFAULT_VERSION + 1}; /* with its quotes */
    struct buf input = {0}, scratch = {0}, text = {0};
    struct span config = {0};
    size_t error_at = 0;
    int valid = 0, is_object = 0;

    signal(SIGPIPE, SIG_IGN); /* a closed stdout or socket is an error to report, not a death */
    if (!command)
        command = "";

    int read_err = isatty(STDIN_FILENO) ? 0 : read_all(STDIN_FILENO, &input);
    if (read_err == EBADF)
        read_err = 0; /* no stdin at all: like plugin.py, the same as an empty one */
    if (read_err) {
        buf_adds(&text, "reading stdin: ");
        errno_text(&text, read_err);
        return emit_error(version, IO_FAILURE, "failed to read the network configuration on stdin", text.data, text.len);
    }
    config.p = input.data ? input.data : "";
    config.n = input.len;
    /* plugin.py tests stdin_text.strip(): \v and \f count as blank too */
    while (config.n && (is_ws(config.p[0]) || config.p[0] == '\v' || config.p[0] == '\f')) {
        config.p++;
        config.n--;
    }
    while (config.n && (is_ws(config.p[config.n - 1]) || config.p[config.n - 1] == '\v' || config.p[config.n - 1] == '\f'))
        config.n--;
    if (config.n) {
        valid = json_valid(config, &error_at);
        is_object = valid && config.p[0] == '{';
        struct span v;
        if (is_object && object_get(config, "cniVersion", &v))
            version = v;
    }

    if (strcmp(command, "VERSION") == 0) {
        buf_adds(&text, "{\"cniVersion\": ");
        buf_add(&text, version.p, version.n);
        buf_adds(&text, ", \"supportedVersions\": [");
        for (size_t i = 0; i < N_SUPPORTED; i++) {
            buf_adds(&text, i ? ", \"" : "\"");
            buf_adds(&text, SUPPORTED[i]);
            buf_adds(&text, "\"");
        }
        buf_adds(&text, "]}\n");
        write_all(STDOUT_FILENO, text.data, text.len);
        return 0;
    }
    if (!command_is(command, commands, sizeof commands / sizeof commands[0])) {
        buf_adds(&text, "CNI_COMMAND=");
        put_repr(&text, command);
        return emit_error(version, INVALID_ENV, "CNI_COMMAND must be one of ADD, DEL, CHECK, STATUS, GC, VERSION",
                          text.data, text.len);
    }
    if (!config.n)
        return emit_error(version, DECODE_FAILURE, "failed to decode the network configuration on stdin",
                          "stdin was empty", strlen("stdin was empty"));
    if (!is_object) {
        char detail[96];
        if (valid)
            snprintf(detail, sizeof detail, "the network configuration is not a JSON object");
        else
            snprintf(detail, sizeof detail, "invalid JSON at char %zu", error_at);
        return emit_error(version, DECODE_FAILURE, "failed to decode the network configuration on stdin", detail,
                          strlen(detail));
    }

    int supported = 0;
    if (version.p[0] == '"') {
        size_t n = decode_string(version, &scratch);
        for (size_t i = 0; i < N_SUPPORTED; i++)
            supported |= n == strlen(SUPPORTED[i]) && memcmp(scratch.data, SUPPORTED[i], n) == 0;
    } else {
        buf_add(&scratch, version.p, version.n);
    }
    if (!supported) {
        struct buf msg = {0};
        buf_adds(&msg, "unsupported cniVersion ");
        buf_adds(&msg, scratch.data);
        buf_adds(&text, "supported: ");
        for (size_t i = 0; i < N_SUPPORTED; i++) {
            buf_adds(&text, i ? ", " : "");
            buf_adds(&text, SUPPORTED[i]);
        }
        return emit_error(version, INCOMPATIBLE_VERSION, msg.data, text.data, text.len);
    }

    struct span sock_tok;
    struct buf path = {0};
    if (object_get(config, "agent_socket", &sock_tok) && !json_falsy(sock_tok)) {
        if (sock_tok.p[0] != '"') {
            static const char d[] = "agent_socket must be a string";
            return emit_error(version, INVALID_CONFIG, "invalid agent_socket in the network configuration", d,
                              strlen(d));
        }
        decode_string(sock_tok, &path);
    } else {
        buf_adds(&path, DEFAULT_SOCKET);
    }

    struct buf request = {0}, reply = {0}, why = {0};
    build_request(&request, config);
    struct span reply_obj = {0}, result = {0}, error = {0};
    if (ask_agent(path.data, path.len, &request, &reply, &why) < 0) {
        if (strcmp(command, "STATUS") == 0)
            return emit_error(version, NOT_AVAILABLE, "felixpy agent is not reachable", why.data, why.len);
        if (strcmp(command, "DEL") == 0)
            return delete_without_agent(version, path.data, &request, &why);
        return emit_error(version, TRY_AGAIN_LATER, "felixpy agent is not reachable", why.data, why.len);
    }
    reply_obj.p = reply.data ? reply.data : "";
    reply_obj.n = reply.len;
    int is_reply_object = json_valid(reply_obj, &error_at);
    if (is_reply_object) {
        struct scan s = {reply_obj.p, reply_obj.p + reply_obj.n};
        skip_ws(&s);
        is_reply_object = s.p < s.end && *s.p == '{';
    }
    if (!is_reply_object) {
        struct buf details = {0};
        buf_add(&details, path.data, path.len);
        buf_adds(&details, ": the agent's reply is not a JSON object" HINT);
        return emit_error(version, TRY_AGAIN_LATER, "felixpy agent is not reachable", details.data, details.len);
    }
    if (object_get(reply_obj, "error", &error)) {
        struct span code = {"5", 1}, msg = {"\"error\"", 7}, details = {"\"\"", 2};
        if (error.p[0] == '{') {
            object_get(error, "code", &code);
            object_get(error, "msg", &msg);
            object_get(error, "details", &details);
        }
        return emit_error_raw(version, code, msg, details);
    }
    int have_result = object_get(reply_obj, "result", &result);
    if (command_is(command, quiet, sizeof quiet / sizeof quiet[0]) && (!have_result || json_falsy(result)))
        return 0;
    if (!have_result) {
        result.p = "{}";
        result.n = 2;
    }
    text.len = 0;
    buf_add(&text, result.p, result.n);
    buf_adds(&text, "\n");
    write_all(STDOUT_FILENO, text.data, text.len);
    return 0;
}
