# syntax=docker/dockerfile:1
# Builds the examples and ships the register_users demo (see docker-compose.yml).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build between `docker build`s;
# the binary is copied out because the target directory is a cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --examples \
    && cp target/release/examples/register_users /usr/local/bin/register_users

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /home/demo demo
COPY --from=builder /usr/local/bin/register_users /usr/local/bin/register_users
USER demo
WORKDIR /home/demo
ENV REGISTER_DB=/tmp/register_users.sqlite
CMD ["register_users"]
