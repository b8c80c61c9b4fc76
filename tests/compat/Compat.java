// The PostgreSQL JDBC driver through the scenario drivers.py runs for the Python drivers:
// run directly and through the gate, the outputs must match.
// Usage: java -cp /usr/share/java/postgresql.jar Compat.java JDBC_URL USER PASSWORD
import java.io.*;
import java.security.MessageDigest;
import java.sql.*;
import java.util.*;
import org.postgresql.PGConnection;
import org.postgresql.copy.CopyManager;

public class Compat {
    static final Map<String, String> out = new TreeMap<>();

    static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c == '\n') b.append("\\n");
            else if (c < 0x20 || c > 0x7e) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        String url = args[0], user = args[1], password = args[2];
        Properties p = new Properties();
        p.setProperty("user", user);
        p.setProperty("password", password);
        p.setProperty("prepareThreshold", "1");
        try {
            run(url, p);
        } catch (Exception e) {
            out.put("failed", q(e.getClass().getSimpleName() + ": " + e.getMessage()));
        }
        StringJoiner j = new StringJoiner(", ", "{", "}");
        out.forEach((k, v) -> j.add(q(k) + ": " + v));
        System.out.println(j);
    }

    static void run(String url, Properties p) throws Exception {
        byte[] blob = new byte[10 * 1024 * 1024];
        for (int i = 0; i < blob.length; i++) blob[i] = (byte) ((i * 7919 + 13) % 256);
        String unicode = "h\u00e9llo \u2713 \uD83D\uDE00 \u4e2d\u6587";
        try (Connection c = DriverManager.getConnection(url, p)) {
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT 1")) {
                r.next();
                out.put("connect", "" + r.getInt(1));
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1, ?::text, ?::int, ?::text")) {
                ps.setInt(1, 41);
                ps.setString(2, unicode);
                ps.setNull(3, Types.INTEGER);
                ps.setNull(4, Types.VARCHAR);
                try (ResultSet r = ps.executeQuery()) {
                    r.next();
                    r.getInt(3);
                    boolean third = r.wasNull();
                    out.put("params", "[" + r.getInt(1) + ", " + q(r.getString(2)) + ", " + (third ? "null" : "?") + ", " + q(r.getString(4)) + "]");
                }
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int * 2")) {
                for (int i = 0; i < 3; i++) {
                    ps.setInt(1, 21);
                    try (ResultSet r = ps.executeQuery()) {
                        r.next();
                        out.put("prepared", "" + r.getInt(1));
                    }
                }
            }
            try (Statement s = c.createStatement()) {
                s.execute("CREATE TEMP TABLE t (id int, v text, b bytea)");
                c.setAutoCommit(false);
                s.execute("INSERT INTO t VALUES (1, 'one', NULL)");
                Savepoint sp = c.setSavepoint("s");
                s.execute("INSERT INTO t VALUES (2, 'two', NULL)");
                c.rollback(sp);
                c.commit();
                try (ResultSet r = s.executeQuery("SELECT count(*) FROM t")) {
                    r.next();
                    out.put("savepoint", "" + r.getInt(1));
                }
                try {
                    s.executeQuery("SELECT 1/0");
                } catch (SQLException e) {
                    out.put("error", q(e.getSQLState()));
                }
                c.rollback();
                try (ResultSet r = s.executeQuery("SELECT 2")) {
                    r.next();
                    out.put("recovered", "" + r.getInt(1));
                }
                try (ResultSet r = s.executeQuery("SELECT g FROM generate_series(1, 100000) g")) {
                    int n = 0, last = 0;
                    while (r.next()) { n++; last = r.getInt(1); }
                    out.put("rows", "[" + n + ", " + last + "]");
                }
                s.setFetchSize(5000);
                try (ResultSet r = s.executeQuery("SELECT g FROM generate_series(1, 100000) g")) {
                    int n = 0;
                    while (r.next()) n++;
                    out.put("server_cursor", "" + n);
                }
                s.setFetchSize(0);
                c.commit();
            }
            try (PreparedStatement ps = c.prepareStatement("INSERT INTO t VALUES (3, 'blob', ?) RETURNING length(b)")) {
                ps.setBytes(1, blob);
                try (ResultSet r = ps.executeQuery()) {
                    r.next();
                    out.put("bytea_in", "" + r.getInt(1));
                }
            }
            try (Statement s = c.createStatement(); ResultSet r = s.executeQuery("SELECT b FROM t WHERE id = 3")) {
                r.next();
                byte[] md5 = MessageDigest.getInstance("MD5").digest(r.getBytes(1));
                StringBuilder hex = new StringBuilder();
                for (byte b : md5) hex.append(String.format("%02x", b));
                out.put("bytea_out", q(hex.toString()));
            }
            CopyManager copy = c.unwrap(PGConnection.class).getCopyAPI();
            copy.copyIn("COPY t (id, v) FROM STDIN", new StringReader("10\tten\n11\t\\N\n"));
            StringWriter w = new StringWriter();
            copy.copyOut("COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)", w);
            out.put("copy", q(w.toString()));
            c.commit();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                s.execute("LISTEN chan");
                s.execute("NOTIFY chan, 'ping'");
                org.postgresql.PGNotification[] n = c.unwrap(PGConnection.class).getNotifications(2000);
                List<String> payloads = new ArrayList<>();
                if (n != null) for (org.postgresql.PGNotification x : n) payloads.add(q(x.getParameter()));
                out.put("notify", payloads.toString());
            }
        }
        Properties timed = (Properties) p.clone();
        timed.setProperty("options", "-c statement_timeout=200");
        try (Connection c = DriverManager.getConnection(url, timed); Statement s = c.createStatement()) {
            s.executeQuery("SELECT pg_sleep(2)");
        } catch (SQLException e) {
            out.put("options_timeout", q(e.getSQLState()));
        }
    }
}
