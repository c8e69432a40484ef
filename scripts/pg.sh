# shellcheck shell=bash
# A throw-away PostgreSQL server for benchmarks and demos, from Debian's postgresql
# package: initdb in a directory, a Unix socket only (no TCP), stopped by pg_stop.
# Source it, then:   pg_start DIR   (sets PG_URL to its "postgres" database)
#                    pg_stop DIR

pg_bin() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -z "$bin" ] || [ ! -x "$bin/postgres" ]; then
        echo "PostgreSQL is not installed: apt-get install postgresql" >&2
        return 1
    fi
    echo "$bin"
}

# Runs a command as the server's user: PostgreSQL refuses to run as root.
pg_as() {
    if [ "$(id -u)" = 0 ]; then
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
    else
        "$@"
    fi
}

pg_start() {
    local dir=$1 bin
    bin=$(pg_bin) || return 1
    rm -rf "$dir"
    mkdir -p "$dir/run"
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$dir"
    pg_as "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        return 1
    }
    pg_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-k $dir/run -c listen_addresses= -c max_connections=300" start >/dev/null
    PG_URL="postgresql://postgres@/postgres?host=$dir/run"
    export PG_URL
}

pg_stop() {
    local dir=$1 bin
    bin=$(pg_bin) || return 0
    [ -d "$dir/data" ] && pg_as "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1
    rm -rf "$dir"
}
