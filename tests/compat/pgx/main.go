// The client compatibility scenario for pgx v4 (Debian's golang-github-jackc-pgx-v4-dev),
// run directly and through the gate; the two outputs must match. Usage: pgx DSN.
// Prints one JSON object: step -> result. Values that differ by connection (pids,
// timings) are never printed.
package main

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

const unicode = "h\u00e9llo \u2713 \U0001F600 \u4e2d\u6587"

var out = map[string]interface{}{}

func blob() []byte {
	b := make([]byte, 10*1024*1024)
	for i := range b {
		b[i] = byte((i*7919 + 13) % 256)
	}
	return b
}

func digest(b []byte) string {
	sum := md5.Sum(b)
	return hex.EncodeToString(sum[:])
}

func sqlstate(err error) string {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return pgErr.Code
	}
	return "not a server error: " + err.Error()
}

func must(err error, what string) {
	if err != nil {
		panic(fmt.Sprintf("%s: %v", what, err))
	}
}

func run(ctx context.Context, dsn string) {
	conn, err := pgx.Connect(ctx, dsn)
	must(err, "connect")
	defer conn.Close(ctx)

	var one int
	must(conn.QueryRow(ctx, "SELECT 1").Scan(&one), "connect")
	out["connect"] = one

	var a int
	var b string
	var c *int
	var d *string
	must(conn.QueryRow(ctx, "SELECT $1::int + 1, $2::text, $3::int, $4::text", 41, unicode, nil, nil).Scan(&a, &b, &c, &d), "params")
	out["params"] = []interface{}{a, b, c, d}

	// pgx asks for binary results wherever it knows the type.
	var n int64
	var s string
	must(conn.QueryRow(ctx, "SELECT 41::int8 + 1, 'x'::text", pgx.QueryResultFormats{pgx.BinaryFormatCode, pgx.BinaryFormatCode}).Scan(&n, &s), "binary")
	out["binary"] = []interface{}{n, s}

	_, err = conn.Prepare(ctx, "twice", "SELECT $1::int * 2")
	must(err, "prepare")
	for i := 0; i < 3; i++ {
		var v int
		must(conn.QueryRow(ctx, "twice", 21).Scan(&v), "prepared")
		out["prepared"] = v
	}

	_, err = conn.Exec(ctx, "CREATE TEMP TABLE t (id int, v text, b bytea)")
	must(err, "create")
	tx, err := conn.Begin(ctx)
	must(err, "begin")
	_, err = tx.Exec(ctx, "INSERT INTO t VALUES (1, 'one', NULL)")
	must(err, "insert")
	nested, err := tx.Begin(ctx) // a savepoint
	must(err, "savepoint")
	_, err = nested.Exec(ctx, "INSERT INTO t VALUES (2, 'two', NULL)")
	must(err, "insert")
	must(nested.Rollback(ctx), "rollback to savepoint")
	must(tx.Commit(ctx), "commit")
	var count int
	must(conn.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&count), "count")
	out["savepoint"] = count

	_, err = conn.Exec(ctx, "SELECT 1/0")
	out["error"] = sqlstate(err)
	var two int
	must(conn.QueryRow(ctx, "SELECT 2").Scan(&two), "recovered")
	out["recovered"] = two

	rows, err := conn.Query(ctx, "SELECT g FROM generate_series(1, 100000) g")
	must(err, "rows")
	got, last := 0, 0
	for rows.Next() {
		must(rows.Scan(&last), "rows")
		got++
	}
	must(rows.Err(), "rows")
	out["rows"] = []int{got, last}

	tx, err = conn.Begin(ctx)
	must(err, "begin")
	_, err = tx.Exec(ctx, "DECLARE big CURSOR FOR SELECT g FROM generate_series(1, 100000) g")
	must(err, "declare")
	fetched := 0
	for {
		batch, err := tx.Query(ctx, "FETCH 5000 FROM big")
		must(err, "fetch")
		inBatch := 0
		for batch.Next() {
			inBatch++
		}
		must(batch.Err(), "fetch")
		if inBatch == 0 {
			break
		}
		fetched += inBatch
	}
	must(tx.Commit(ctx), "commit")
	out["server_cursor"] = fetched

	data := blob()
	var length int
	must(conn.QueryRow(ctx, "INSERT INTO t VALUES (3, 'blob', $1) RETURNING length(b)", data).Scan(&length), "bytea_in")
	out["bytea_in"] = length
	var back []byte
	must(conn.QueryRow(ctx, "SELECT b FROM t WHERE id = 3").Scan(&back), "bytea_out")
	out["bytea_out"] = digest(back)

	// COPY FROM STDIN in pgx's binary format, then out as csv and text.
	copied, err := conn.CopyFrom(ctx, pgx.Identifier{"t"}, []string{"id", "v"}, pgx.CopyFromRows([][]interface{}{{10, "ten"}, {11, nil}}))
	must(err, "copy_binary")
	out["copy_binary"] = copied
	var csv bytes.Buffer
	_, err = conn.PgConn().CopyTo(ctx, &csv, "COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)")
	must(err, "copy out")
	_, err = conn.PgConn().CopyFrom(ctx, strings.NewReader("20\ttwenty\n21\t\\N\n"), "COPY t (id, v) FROM STDIN")
	must(err, "copy in")
	var text bytes.Buffer
	_, err = conn.PgConn().CopyTo(ctx, &text, "COPY (SELECT id, v FROM t WHERE id >= 20 ORDER BY id) TO STDOUT")
	must(err, "copy out")
	out["copy"] = csv.String() + text.String()

	// Pipelining: a batch is sent in one go and read back in order.
	batch := &pgx.Batch{}
	batch.Queue("SELECT 1")
	batch.Queue("SELECT $1::text", "piped")
	results := conn.SendBatch(ctx, batch)
	var p1 int
	var p2 string
	must(results.QueryRow().Scan(&p1), "pipeline")
	must(results.QueryRow().Scan(&p2), "pipeline")
	must(results.Close(), "pipeline")
	out["pipeline"] = []interface{}{p1, p2}

	_, err = conn.Exec(ctx, "LISTEN chan")
	must(err, "listen")
	_, err = conn.Exec(ctx, "NOTIFY chan, 'ping'")
	must(err, "notify")
	wait, cancel := context.WithTimeout(ctx, 2*time.Second)
	note, err := conn.WaitForNotification(wait)
	cancel()
	must(err, "notification")
	out["notify"] = []string{note.Payload}

	_, err = conn.Exec(ctx, "SET statement_timeout = 200")
	must(err, "set")
	_, err = conn.Exec(ctx, "SELECT pg_sleep(2)")
	out["set_timeout"] = sqlstate(err)
	_, err = conn.Exec(ctx, "RESET statement_timeout")
	must(err, "reset")

	// Cancellation: a CancelRequest on a second connection, with the key the gate handed
	// out, while the statement runs; the connection stays usable.
	go func() {
		time.Sleep(300 * time.Millisecond)
		_ = conn.PgConn().CancelRequest(ctx)
	}()
	_, err = conn.Exec(ctx, "SELECT pg_sleep(5)")
	out["cancel"] = sqlstate(err)
	var three int
	must(conn.QueryRow(ctx, "SELECT 3").Scan(&three), "after cancel")
	out["after_cancel"] = three

	cfg, err := pgx.ParseConfig(dsn)
	must(err, "config")
	cfg.RuntimeParams["options"] = "-c statement_timeout=200"
	timed, err := pgx.ConnectConfig(ctx, cfg)
	must(err, "options connect")
	_, err = timed.Exec(ctx, "SELECT pg_sleep(2)")
	out["options_timeout"] = sqlstate(err)
	timed.Close(ctx)

}

func main() {
	defer func() {
		if r := recover(); r != nil {
			out["failed"] = fmt.Sprint(r)
		}
		enc, _ := json.Marshal(out)
		fmt.Println(string(enc))
	}()
	run(context.Background(), os.Args[1])
}
