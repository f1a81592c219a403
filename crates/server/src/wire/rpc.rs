//! get_all_records encoded straight from the tables.

use crate::context::Server;
use corral_model::schema::ClassId;
use corral_model::xmlrpc;

impl Server {
    /// Encodes `<class>.get_all_records` as the XML-RPC `<value>` or the
    /// JSON-RPC result, field by field from the tables.
    pub fn write_all_records(&self, c: ClassId, json: bool, out: &mut String) {
        let st = self.db.read();
        out.push_str(if json { "{" } else { "<value><struct>" });
        let mut first = true;
        for r in st.refs(c) {
            if json {
                if !first {
                    out.push(',');
                }
                corral_model::jsonrpc::write_str(r, out);
                out.push_str(":{");
            } else {
                out.push_str("<member><name>");
                xmlrpc::escape_into(r, out);
                out.push_str("</name><value><struct>");
            }
            first = false;
            let mut first_field = true;
            st.visit_record(c, r, |name, v| {
                if json {
                    if !first_field {
                        out.push(',');
                    }
                    corral_model::jsonrpc::write_str(name, out);
                    out.push(':');
                    corral_model::jsonrpc::write_value(v, out);
                } else {
                    out.push_str("<member><name>");
                    out.push_str(name);
                    out.push_str("</name>");
                    xmlrpc::write_value(v, out);
                    out.push_str("</member>");
                }
                first_field = false;
            });
            out.push_str(if json {
                "}"
            } else {
                "</struct></value></member>"
            });
        }
        out.push_str(if json { "}" } else { "</struct></value>" });
    }

    /// Bytes per record of the last encoding of each class, to size the
    /// next one's buffer in one allocation.
    pub fn records_size_hint(&self, c: ClassId) -> usize {
        let per = self
            .record_sizes
            .get(c.0)
            .map(|a| a.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0);
        (per.max(256) * self.db.read().count(c)).saturating_add(4096)
    }

    pub fn note_records_size(&self, c: ClassId, bytes: usize) {
        let n = self.db.read().count(c).max(1);
        if let Some(a) = self.record_sizes.get(c.0) {
            a.store(bytes / n + 16, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
