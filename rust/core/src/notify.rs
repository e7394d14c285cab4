//! Doorbells: eventfds, an epoll poller, busy-polling.
