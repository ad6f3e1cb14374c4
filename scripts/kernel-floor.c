/*
 * kernel-floor: the least any bus can spend per connection and per round
 * trip on this machine, for docs/BENCHMARKS.md's rows that are bounded by
 * the kernel (scripts/kernel-floor.py builds and drives it).
 *
 *   kernel-floor serve PATH      a "bus" that does only the system calls
 *                                 every bus must: accept4, SO_PEERCRED,
 *                                 epoll registration, one read per client
 *                                 line or message, one write per answer
 *                                 (a canned OK and Hello reply plus
 *                                 NameAcquired, as busvisor sends them),
 *                                 close. After Hello, the first client is
 *                                 the echo and every byte another client
 *                                 sends is relayed to it, and back to the
 *                                 last sender: a bus's forwarding with no
 *                                 routing, no parsing, no policy. Alone,
 *                                 the first client is answered with its
 *                                 own bytes: the bus answering a call to
 *                                 the bus itself.
 *   kernel-floor echo PATH       answers each message with its own bytes
 *   kernel-floor ping PATH N     N messages of 160 bytes, one in flight
 *
 * It parses nothing it is sent beyond line ends: it is a floor, not a bus.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define MAXC 4096
enum { AUTH, HELLO, RUN };
struct conn {
	int fd, state, serial;
};
static struct conn conns[MAXC];
static int echo_fd = -1, last_sender = -1, next_id;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static size_t put_field(unsigned char *m, size_t o, int code, char sig, const char *s)
{
	o = (o + 7) & ~7UL;
	m[o] = code;
	m[o + 1] = 1;
	m[o + 2] = sig;
	m[o + 3] = 0;
	o += 4;
	if (sig == 'g') {
		m[o] = strlen(s);
		memcpy(m + o + 1, s, strlen(s) + 1);
		return o + 2 + strlen(s);
	}
	unsigned n = strlen(s);
	memcpy(m + o, &n, 4);
	memcpy(m + o + 4, s, n + 1);
	return o + 5 + n;
}

/* A message from the bus with a string body (the Hello reply's unique
 * name, NameAcquired's name). */
static size_t bus_msg(unsigned char *m, int type, int serial, int reply_to, const char *dest,
		      const char *member, const char *body)
{
	memset(m, 0, 512);
	m[0] = 'l';
	m[1] = type;
	m[2] = 1;
	m[3] = 1;
	memcpy(m + 8, &serial, 4);
	size_t o = 16;
	if (type == 4) {
		o = put_field(m, o, 1, 'o', "/org/freedesktop/DBus");
		o = put_field(m, o, 2, 's', "org.freedesktop.DBus");
		o = put_field(m, o, 3, 's', member);
	} else {
		o = (o + 7) & ~7UL;
		m[o] = 5;
		m[o + 1] = 1;
		m[o + 2] = 'u';
		memcpy(m + o + 4, &reply_to, 4);
		o += 8;
	}
	o = put_field(m, o, 6, 's', dest);
	o = put_field(m, o, 7, 's', "org.freedesktop.DBus");
	o = put_field(m, o, 8, 'g', "s");
	unsigned fields = o - 16;
	memcpy(m + 12, &fields, 4);
	o = (o + 7) & ~7UL;
	unsigned n = strlen(body), blen = 5 + n;
	memcpy(m + 4, &blen, 4);
	memcpy(m + o, &n, 4);
	memcpy(m + o + 4, body, n + 1);
	return o + blen;
}

static void send_all(int fd, const void *p, size_t n)
{
	while (n) {
		ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			return;
		}
		p = (const char *)p + w;
		n -= w;
	}
}

static void serve(const char *path)
{
	int l = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	strncpy(a.sun_path, path, sizeof a.sun_path - 1);
	if (l < 0 || bind(l, (void *)&a, sizeof a) || listen(l, 128))
		die("listen");
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
	epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
	printf("unix:path=%s\n", path);
	fflush(stdout);
	static unsigned char buf[65536], m1[512], m2[512];
	struct epoll_event evs[64];
	for (;;) {
		int n = epoll_wait(ep, evs, 64, -1);
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;
			if (fd == l) {
				int c;
				while ((c = accept4(l, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
					struct ucred cr;
					socklen_t cl = sizeof cr;
					getsockopt(c, SOL_SOCKET, SO_PEERCRED, &cr, &cl);
					if (c >= MAXC) {
						close(c);
						continue;
					}
					conns[c] = (struct conn){c, AUTH, 0};
					struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
					epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
				}
				continue;
			}
			struct conn *cn = &conns[fd];
			ssize_t r = recv(fd, buf, sizeof buf, 0);
			if (r <= 0) {
				if (r < 0 && errno == EAGAIN)
					continue;
				epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
				close(fd);
				if (fd == echo_fd)
					echo_fd = -1;
				continue;
			}
			if (cn->state == AUTH) {
				send_all(fd, "OK 0123456789abcdef0123456789abcdef\r\n", 37);
				cn->state = HELLO;
			} else if (cn->state == HELLO) {
				char name[32];
				snprintf(name, sizeof name, ":1.%d", next_id++);
				struct iovec iov[2] = {
					{m1, bus_msg(m1, 2, 1, 1, name, NULL, name)},
					{m2, bus_msg(m2, 4, 2, 0, name, "NameAcquired", name)},
				};
				struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 2};
				sendmsg(fd, &mh, MSG_NOSIGNAL);
				cn->state = RUN;
				if (echo_fd < 0)
					echo_fd = fd;
			} else if (fd == echo_fd) {
				send_all(last_sender >= 0 ? last_sender : fd, buf, r);
			} else if (echo_fd >= 0) {
				last_sender = fd;
				send_all(echo_fd, buf, r);
			}
		}
	}
}

static int client(const char *path)
{
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	strncpy(a.sun_path, path, sizeof a.sun_path - 1);
	if (s < 0 || connect(s, (void *)&a, sizeof a))
		die("connect");
	char b[4096];
	send_all(s, "\0AUTH EXTERNAL 30\r\n", 19);
	if (recv(s, b, sizeof b, 0) <= 0)
		die("auth");
	send_all(s, "BEGIN\r\nHello", 12);
	/* the Hello reply and NameAcquired: 2 messages, maybe 2 reads */
	ssize_t got = 0;
	while (got < 2 * 100) {
		ssize_t r = recv(s, b + got, sizeof b - got, 0);
		if (r <= 0)
			die("hello");
		got += r;
	}
	return s;
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "serve")) {
		serve(argv[2]);
	} else if (argc >= 3 && !strcmp(argv[1], "echo")) {
		int s = client(argv[2]);
		char b[65536];
		printf("ready\n");
		fflush(stdout);
		for (;;) {
			ssize_t r = recv(s, b, sizeof b, 0);
			if (r <= 0)
				return 0;
			send_all(s, b, r);
		}
	} else if (argc >= 4 && !strcmp(argv[1], "ping")) {
		int s = client(argv[2]);
		long n = atol(argv[3]);
		char m[160] = "l", b[160];
		for (long i = 0; i < n; i++) {
			send_all(s, m, sizeof m);
			for (size_t got = 0; got < sizeof b;) {
				ssize_t r = recv(s, b + got, sizeof b - got, 0);
				if (r <= 0)
					die("ping");
				got += r;
			}
		}
		return 0;
	} else {
		fprintf(stderr, "usage: kernel-floor serve PATH | echo PATH | ping PATH N\n");
		return 2;
	}
}
