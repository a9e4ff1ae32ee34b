# pgferry in a container: built from this repository, run on Debian slim with the PostgreSQL
# client tools (pg_dump, pg_restore and psql, which `pgferry schema` and the rehearsal's script
# use). Used by docker-compose.yml; not exercised by the test suite.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p pgferry \
 && cp target/release/pgferry /usr/local/bin/pgferry

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-client ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/pgferry /usr/local/bin/pgferry
COPY docker/rehearse.sh /usr/local/bin/pgferry-rehearse
USER nobody
EXPOSE 9187
ENTRYPOINT ["pgferry"]
CMD ["--help"]
