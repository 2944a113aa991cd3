"""`python -m llmtp.coordinator.bench.echo_probe`: a ZeroMQ ROUTER that sends every message
back until it gets b"quit"; prints its endpoint first. The far end of the round-trip probe."""

import zmq


def main() -> None:
    socket = zmq.Context().socket(zmq.ROUTER)
    socket.bind("tcp://127.0.0.1:*")
    print(socket.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        frames = socket.recv_multipart()
        if frames[1] == b"quit":
            break
        socket.send_multipart(frames)


if __name__ == "__main__":
    main()
